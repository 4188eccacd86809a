"""Training recurrent models on the tasks: a jit-compiled optax step, checkpoints, resume.

``train(config, out)`` runs ``config.steps`` steps, saving a checkpoint every
``config.save_every`` steps and at the end (`jaxbptt.checkpoint`); pointed at a
directory holding a run, it resumes from the last good checkpoint, and ends with
the same parameters as a run that was never interrupted (batches are drawn from
``(seed, step)``, the step is deterministic). Ctrl-C finishes the current step,
saves it and stops; a loss that is not finite stops the run before it is saved,
so the checkpoints keep the parameters from before it diverged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbptt import checkpoint, tasks
from jaxbptt._driver import affine
from jaxbptt.gru import gru, init_gru
from jaxbptt.lstm import init_lstm, lstm
from jaxbptt.output import cross_entropy, init_output, logits
from jaxbptt.rnn import init_rnn, rnn

CELLS = {"rnn": (rnn, init_rnn), "lstm": (lstm, init_lstm), "gru": (gru, init_gru)}
# Fields that may change when a run is resumed; every other one defines the run.
RESUMABLE = ("steps", "save_every", "sample_every", "devices")


@dataclasses.dataclass(frozen=True)
class Config:
    """What defines a training run (saved in every checkpoint)."""

    task: str = "charlm"
    cell: str = "rnn"  # rnn | lstm | gru (the course's GRU)
    hidden: int = 50
    T: int = 0  # length of "adding", delay of "copy" (0: the task's default)
    steps: int = 2000
    batch: int = 32
    optimizer: str = "adam"  # adam | sgd
    lr: float = 0.01
    clip: str = "value"  # value: element-wise at clip_value (the course) | norm: global | none
    clip_value: float = 5.0
    backward: str = "bptt"  # bptt | autodiff
    seed: int = 0
    save_every: int = 500
    sample_every: int = 500
    devices: int = 1  # data parallel over this many devices (the batch is split)


def optimizer(config: Config):
    clip = {"value": optax.clip(config.clip_value),
            "norm": optax.clip_by_global_norm(config.clip_value),
            "none": optax.identity()}[config.clip]
    opt = {"adam": optax.adam, "sgd": optax.sgd}[config.optimizer](config.lr)
    return optax.chain(clip, opt)


def init(config: Config, task):
    """Fresh ``(params, opt_state)``: {"cell": cell params, "out": OutputParams}."""
    k_cell, k_out = jax.random.split(jax.random.PRNGKey(config.seed))
    params = {"cell": CELLS[config.cell][1](k_cell, task.n_in, config.hidden),
              "out": init_output(k_out, config.hidden, task.n_out)}
    return params, optimizer(config).init(params)


def loss_fn(config: Config, task, params, batch, probe=None):
    """Mean loss per weighted position (nats per symbol, or MSE for "regress").

    ``probe`` (zeros shaped like the states over time) exposes dL/d(state<t>) as its
    gradient (see `jaxbptt.gradflow`).
    """
    fn = CELLS[config.cell][0]
    hs, _ = fn(params["cell"], batch.xs, lengths=batch.lengths, backward=config.backward,
               probe=probe)
    if task.kind == "regress":
        pred = affine(hs[-1], params["out"].Wya, params["out"].by)[:, 0]
        return jnp.mean((pred - batch.targets) ** 2)
    total = cross_entropy(params["out"], hs, batch.targets, batch.weights,
                          backward=config.backward)
    return total / jnp.sum(batch.weights)


def make_step(config: Config, task):
    opt = optimizer(config)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(config, task, p, batch))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def sample_names(config: Config, params, key, n=8, max_len=20):
    """Names sampled character by character from a charlm model (stateful sampling).

    A name ends at the first end-of-name symbol, so one sampled first is ``""``;
    a name still going after ``max_len`` characters ends in "…".
    """
    fn = CELLS[config.cell][0]
    vocab = len(tasks.VOCAB)

    @jax.jit
    def run(params, key):
        def body(carry, key_t):
            x, state = carry
            hs, state = fn(params["cell"], x[None], state)
            idx = jax.random.categorical(key_t, logits(params["out"], hs[0]))
            return (jax.nn.one_hot(idx, vocab, dtype=x.dtype), state), idx

        x0 = jnp.zeros((n, vocab), jnp.float32)
        _, state_shape = jax.eval_shape(lambda: fn(params["cell"], x0[None]))
        state0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state_shape)
        _, ids = jax.lax.scan(body, (x0, state0), jax.random.split(key, max_len))
        return ids.T

    out = []
    for row in np.asarray(run(params, key)):
        text = tasks.decode(row)
        out.append(text.split("\n")[0] if "\n" in text else text + "…")
    return out


def listed(names):
    """Sampled names on one line, an empty one shown as "(empty)"."""
    return ", ".join(name or "(empty)" for name in names)


# Steps dispatched ahead of the last one finished. With the batch split over a CPU's host
# devices (--devices N, XLA_FLAGS=--xla_force_host_platform_device_count=N), jax 0.10's CPU
# runtime can hang in the all-reduce of the parameter gradients once some 60-150 steps are
# queued unawaited (measured: 2 or 4 devices, LSTM hidden 32-128, batch 32; and a plain jitted
# step with one all-reduce). Waiting so that at most two steps are queued avoided it in every
# run tried; on one device it cost nothing measurable (300 steps in 3.7-3.8 s either way).
_IN_FLIGHT = 2


def check_devices(config: Config):
    """The devices of ``jax.devices()`` for ``config.devices``; a ValueError when there are
    too few or they do not divide the batch."""
    n, available = config.devices, jax.devices()
    if n > len(available):
        raise ValueError(f"--devices {n} but JAX sees {len(available)} device(s); on a CPU, "
                         f"set XLA_FLAGS=--xla_force_host_platform_device_count={n} (or, "
                         f"before JAX starts, jax.config.update('jax_num_cpu_devices', {n}))")
    if config.batch % n:
        raise ValueError(f"--batch {config.batch} must be divisible by --devices {n}")
    return available


def placement(config: Config):
    """``(put_params, put_batch)``: where params and batches live for ``config.devices``.

    One device: both are the identity. N devices: a 1-D mesh with an Explicit axis over the
    first N of ``jax.devices()``; params and optimizer state replicated, every batch array split
    along its batch axis (axis 1 of (T, B, ...), axis 0 of (B,)). The jitted step then
    runs data-parallel under XLA's SPMD partitioner, parameter gradients all-reduced.
    """
    n = config.devices
    if n == 1:
        return (lambda tree: tree), (lambda batch: batch)
    available = check_devices(config)
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    # An Explicit axis: with --backward bptt the driver sums the parameter gradients in one
    # all-reduce per step of training, not one per chunk as on an Auto axis (autodiff does one
    # per time step on either; docs/many_devices.md). On 2 host devices: 300 steps of LSTM
    # (hidden 128, batch 32) adding in 3.1-3.2 s against 3.3-3.5 s.
    mesh = jax.make_mesh((n,), ("batch",), axis_types=(AxisType.Explicit,),
                         devices=available[:n])
    replicated = NamedSharding(mesh, P())

    def split(x):
        if x is None:
            return None
        spec = P("batch") if x.ndim == 1 else P(None, "batch", *([None] * (x.ndim - 2)))
        return jax.device_put(x, NamedSharding(mesh, spec))

    return (lambda tree: jax.device_put(tree, replicated)), (lambda b: tasks.Batch(*map(split, b)))


class Progress:
    """A one-line progress bar on stderr (redrawn in place on a terminal)."""

    def __init__(self, total, start=0, desc="", stream=None):
        stream = sys.stderr if stream is None else stream  # (read now: it may be redirected)
        self.total, self.n, self.desc, self.stream = total, start, desc, stream
        self.t0, self.last, self.line, self.cleared = time.perf_counter(), -1.0, "", False
        self.tty = stream.isatty()

    def update(self, n, postfix=""):
        self.n = n
        now = time.perf_counter()
        if n < self.total and now - self.last < (0.2 if self.tty else 5.0):
            return
        self.last = now
        frac = n / max(self.total, 1)
        bar = "#" * int(24 * frac) + "-" * (24 - int(24 * frac))
        self.line = f"{self.desc} [{bar}] {n}/{self.total} {now - self.t0:5.1f}s {postfix}"
        self.stream.write(("\r" + self.line) if self.tty else (self.line + "\n"))
        if self.tty and n >= self.total:
            self.stream.write("\n")
        self.stream.flush()

    def clear(self):
        """Erases the bar's line on a terminal, before other output (then `redraw`)."""
        if self.tty and 0 <= self.last and self.n < self.total:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.cleared = True

    def redraw(self):
        """Draws the bar again below the output that `clear` made room for."""
        if self.cleared:
            self.stream.write("\r" + self.line)
            self.stream.flush()
            self.cleared = False


class _Interrupts:
    """Ctrl-C (SIGINT) while a run is in ``train``. A first one only sets ``requested``:
    the run stops before its first step ("starting"), or finishes its step, saves and
    stops ("training"), or writes its history.json and loss.png ("finishing"). A second
    one interrupts at once: KeyboardInterrupt, or with ``exit_at_once`` (the command
    line) the process exits, status 130; there, a first one before training exits at
    once too (nothing is written before the first step, and the start-up compiles)."""

    def __init__(self, exit_at_once=False):
        self.exit_at_once = exit_at_once

    def __enter__(self):
        self.requested, self.phase, self._previous = False, "starting", None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        at_once = self.requested or self.exit_at_once and self.phase == "starting"
        if at_once and not self.exit_at_once:
            raise KeyboardInterrupt
        if at_once:  # (checkpoints are written atomically: none is left half saved)
            checkpoint.exit_at_once(
                "\ninterrupted before the first step: nothing was saved\n"
                if self.phase == "starting" else "\ninterrupted: the checkpoints saved so "
                "far are kept; run the same command to resume\n")
        self.requested = True
        _say("\ninterrupted: " + {
            "starting": "stopping before the first step",
            "training": "finishing this step and saving it",
            "finishing": "writing history.json and loss.png, then stopping",
        }[self.phase] + " (Ctrl-C again to stop at once)\n")

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _say(message):
    """Writes to stderr from a signal handler (never raises)."""
    try:
        sys.stderr.write(message)
        sys.stderr.flush()
    except (OSError, RuntimeError, ValueError):  # a closed pipe, a reentrant write
        pass


def _compatible(meta: dict, config: Config):
    """Refuses a checkpoint of another run; a manifest without this module's metadata
    (edited by hand?) is unreadable (ValueError), and skipped like a corrupted one."""
    for key in ("config", "history"):
        if key not in meta:
            raise ValueError(f"its metadata has no {key!r}")
    saved = meta["config"]

    def same(k, v):
        if k == "T" and saved.get("task") == config.task and isinstance(saved.get(k), int):
            # 0 stands for the task's default T: the same run as that T written out
            return tasks.get(config.task, saved[k]).T == tasks.get(config.task, v).T
        return saved.get(k) == v

    diffs = [f"{k}={saved.get(k)!r} (asked {v!r})" for k, v in dataclasses.asdict(config).items()
             if k not in RESUMABLE and not same(k, v)]
    if diffs:
        raise checkpoint.CheckpointError(
            "the checkpoint in this --out was written by another model or run: "
            + ", ".join(diffs) + "; use another --out or the same settings")


def train(config: Config, out: str, *, log=print, progress=True,
          exit_on_second_interrupt=False) -> dict:
    """Trains (or resumes) the run in ``out``; returns a summary dict.

    A first Ctrl-C saves the current step and returns (``summary["interrupted"]``); a
    second raises KeyboardInterrupt, or exits the process with
    ``exit_on_second_interrupt`` (as the command line does).

    Writes ``out/checkpoints/ckpt-*``, ``out/history.json`` and, with matplotlib,
    ``out/loss.png``. One run at a time trains in ``out``: a second raises
    `checkpoint.Busy`.
    """
    task = tasks.get(config.task, config.T)
    check_devices(config)  # before ``out`` is made
    os.makedirs(out, exist_ok=True)
    with checkpoint.locked(out, wait=False), _Interrupts(exit_on_second_interrupt) as interrupt:
        return _train(config, out, task, log, progress, interrupt)


def _writable(out, ckpt_dir, start, end):
    """Raises `checkpoint.CheckpointError` before training when something in ``out``
    would stop this run from saving its checkpoints, history.json or loss.png."""
    def refuse(what, saves, fix="move it away"):
        raise checkpoint.CheckpointError(f"{what}, and this run saves {saves} there: {fix} "
                                         "or choose another --out")

    if os.path.lexists(ckpt_dir) and not os.path.isdir(ckpt_dir):
        refuse(f"{ckpt_dir} is not a directory", "its checkpoints")
    for n in ("history.json", "loss.png", "history.json.tmp", "loss.png.tmp"):
        if os.path.isdir(os.path.join(out, n)):
            refuse(f"{os.path.join(out, n)} is a directory", f"its {n.removesuffix('.tmp')}")
    os.makedirs(ckpt_dir, exist_ok=True)
    for n in sorted(os.listdir(ckpt_dir)):  # (a save may come at any step up to the end)
        step, path = checkpoint.step_of(n), os.path.join(ckpt_dir, n)
        if start < (step or 0) <= end and not os.path.isdir(path):
            refuse(f"{path} is not a checkpoint directory", f"step {step}'s checkpoint")
    for d in (out, ckpt_dir):
        try:
            with tempfile.TemporaryFile(dir=d):
                pass
        except OSError as e:
            refuse(f"{d} is not writable ({e.strerror or e})", "its files", "make it writable")


def _train(config, out, task, log, progress, interrupt):
    ckpt_dir = os.path.join(out, "checkpoints")
    if os.path.lexists(ckpt_dir) and not os.path.isdir(ckpt_dir):  # (read as no run, else)
        _writable(out, ckpt_dir, 0, config.steps)  # (refused)
    template = init(config, task)
    put_params, put_batch = placement(config)
    try:
        found = checkpoint.restore_latest(ckpt_dir, template,
                                          lambda meta: _compatible(meta, config))
    except checkpoint.NoReadableCheckpoint as e:
        raise checkpoint.NoReadableCheckpoint(f"{e}: move them away to start afresh") from None
    run_config = dataclasses.asdict(config)
    if found is None:
        # A fresh run writes history.json and loss.png at its end: never over files of the
        # same names that no checkpoint here accounts for (another run's, the user's own).
        taken = [f for f in ("history.json", "loss.png") if os.path.lexists(os.path.join(out, f))]
        if taken:
            it = "them" if len(taken) > 1 else "it"
            raise checkpoint.CheckpointError(
                f"{out} holds {' and '.join(taken)} but no checkpoint: a new run would write "
                f"over {it}; move {it} away or choose another --out")
        (params, opt_state), start, history = template, 0, []
    else:
        (params, opt_state), manifest = found
        start, history = manifest["step"], list(manifest["meta"]["history"])
        run_config = manifest["meta"]["config"]
    if start < config.steps:  # (a finished run may sit in a read-only directory)
        _writable(out, ckpt_dir, start, config.steps)
    if found is not None:
        log(f"resuming from step {start} ({ckpt_dir})")
    params, opt_state = put_params((params, opt_state))
    step_fn = make_step(config, task)
    if start < config.steps and not interrupt.requested:
        # Compiled here, still "starting" (the longest wait before the first step): a
        # Ctrl-C meanwhile stops the run with nothing saved. The loop's calls reuse it.
        step_fn.lower(params, opt_state,
                      put_batch(task.batch(config.seed, start, config.batch))).compile()
    key = jax.random.PRNGKey(config.seed)
    k_during, k_final = jax.random.split(jax.random.fold_in(key, 1))  # sampling only

    def kept():
        return (f"the checkpoints up to step {saved_at} are kept" if saved_at
                else "no checkpoint was saved")

    def diverged(what):  # raised before anything non-finite is saved
        return FloatingPointError(f"{what}: training diverged. {kept().capitalize()}; lower "
                                  "--lr or clip the gradients (--clip, --clip-value)")

    def save(step):
        if not all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params)):
            raise diverged(f"the parameters are not finite after step {step}")
        meta = {"config": dataclasses.asdict(config), "history": history,
                "data_position": step * config.batch, "task_seed": config.seed,
                "rng_key": np.asarray(jax.random.key_data(key)).tolist()}
        try:
            checkpoint.save(ckpt_dir, step, (params, opt_state), meta)
        except OSError as e:  # disk full, a directory made read-only meanwhile...
            raise OSError(f"cannot save the checkpoint of step {step} in {ckpt_dir} "
                          f"({e.strerror or e}); {kept()}") from e

    bar = Progress(config.steps, start, f"train {config.task} {config.cell}") if progress else None

    def say(message):
        if bar is not None:
            bar.clear()
        try:
            log(message)
        except BrokenPipeError:  # the reader is gone (Ctrl-C in a pipe): train on, save
            pass
        if bar is not None:
            bar.redraw()

    def flush(done, pending):  # the losses of the steps up to ``done``
        losses = [float(x) for x in pending]
        bad = next((i for i, x in enumerate(losses) if not math.isfinite(x)), None)
        if bad is not None:
            raise diverged(f"the loss is {losses[bad]} at step {done - len(losses) + bad + 1}")
        history.extend(losses)

    pending, saved_at, done = [], start, start
    t0 = time.perf_counter()
    interrupt.phase, stopped_at_start = "training", interrupt.requested
    for step in range(start, config.steps) if not stopped_at_start else ():
        batch = put_batch(task.batch(config.seed, step, config.batch))
        params, opt_state, loss = step_fn(params, opt_state, batch)
        pending.append(loss)
        if len(pending) > _IN_FLIGHT:  # wait for an earlier step: see _IN_FLIGHT
            pending[-_IN_FLIGHT - 1].block_until_ready()
        done, stop = step + 1, interrupt.requested  # (read once: a later Ctrl-C waits)
        last = done == config.steps or stop
        if done % config.save_every == 0 or last or bar is not None and done % 50 == 0:
            flush(done, pending)
            pending = []
            if bar is not None:
                bar.update(done, f"loss {history[-1]:.4f}")
        if done % config.save_every == 0 or last:
            save(done)
            saved_at = done
        if stop:
            break
        if config.task == "charlm" and config.sample_every and done % config.sample_every == 0:
            say(f"step {done}: " + listed(
                sample_names(config, params, jax.random.fold_in(k_during, done))))
    elapsed = time.perf_counter() - t0
    interrupt.phase = "finishing"
    # The loss at the start and at the end of this call's steps, each a mean over as many
    # steps (up to 20, and not overlapping); with no new step, the run's last steps.
    new = history[start:]
    window = max(1, min(_SMOOTH, len(new) // 2)) if new else min(_SMOOTH, len(history))
    summary = {"task": config.task, "cell": config.cell, "backward": config.backward,
               "steps": config.steps, "resumed_from": start, "stopped_at": done,
               "interrupted": done < config.steps,
               "first_loss": float(np.mean(new[:window])) if new else None,
               "final_loss": float(np.mean((new or history)[-window:])) if history else None,
               "loss_window": window,
               "baseline": task.baseline, "seconds": elapsed,
               "checkpoint": (os.path.join(ckpt_dir, checkpoint.name(saved_at)) if saved_at
                              else None)}
    if config.task == "charlm" and config.sample_every and not stopped_at_start:
        summary["samples"] = sample_names(config, params, k_final, n=10)
    summary["params"], summary["opt_state"] = params, opt_state
    # loss.png, then history.json (which records the plot's digest) are written after the
    # last checkpoint: a run killed before it wrote them, or whose files were damaged since,
    # has them written again from its checkpoint by the same command.
    history_path, plot_path = os.path.join(out, "history.json"), os.path.join(out, "loss.png")
    if done == start and (stopped_at_start or _holds(history_path, history, plot_path)):
        # nothing new (or stopped before the first step): they stay as they are
        summary["plot"] = None
        return summary
    path = plot_path
    try:
        summary["plot"] = plot_history(history, task, config, plot_path)
        if done == start:  # mended by a call that trained nothing: the run's own settings
            summary["mended"] = True
        record = {k: v for k, v in summary.items() if k not in ("params", "opt_state", "plot")}
        path = history_path
        checkpoint.write_atomically(history_path, lambda f: json.dump(
            {"config": run_config if done == start else dataclasses.asdict(config),
             "loss": history, "plot_sha256": summary["plot"] and checkpoint.sha256(plot_path),
             "summary": record}, f))
    except OSError as e:  # (a full disk...): the same command writes them from the checkpoint
        raise OSError(f"cannot write {path} ({e.strerror or e}); {kept()}, and the same "
                      "command writes it again from the last one") from e
    return summary


_SMOOTH = 20  # steps averaged for the summary's first and final loss


def _holds(history_path, history, plot_path):
    """Whether history.json holds exactly these losses and loss.png is the plot it records
    (one that records none, written without matplotlib or by an earlier version: that
    loss.png exists)."""
    try:
        with open(history_path) as f:
            record = json.load(f)
        digest = record.get("plot_sha256")
        return record["loss"] == history and (
            digest == checkpoint.sha256(plot_path) if digest else os.path.exists(plot_path) or not history)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def plot_history(history, task, config, path):
    """Learning curve PNG (raw and smoothed loss, with the task's baseline); None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    loss = np.asarray(history)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    w = len(loss) // 50  # steps in the running mean drawn over the raw curve (none if < 2)
    ax.plot(np.arange(1, len(loss) + 1), loss, color="tab:blue", alpha=0.3 if w > 1 else 1.0,
            lw=0.8, label="per step")
    if w > 1:
        smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(w, len(loss) + 1), smooth, color="tab:blue", lw=2,
                label=f"mean of {w} steps")
    ax.axhline(task.baseline, color="gray", ls="--", lw=1, label="baseline (no learning)")
    unit = "MSE" if task.kind == "regress" else "cross-entropy (nats per symbol)"
    ax.set(xlabel="training step", ylabel=unit,
           title=f"{config.task}: {config.cell.upper()} n_a={config.hidden}, {config.optimizer} "
                 f"lr={config.lr}, backward={config.backward}")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    checkpoint.write_atomically(path, lambda f: fig.savefig(f, format="png"), "wb")
    plt.close(fig)
    return path
