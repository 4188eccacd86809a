"""The ``jaxbptt`` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
import warnings

from jaxbptt import checkpoint  # (at import: a signal handler must not import)


def _check(args) -> int:
    import jax

    jax.config.update("jax_enable_x64", True)
    from jaxbptt import check

    start = time.perf_counter()
    results = check.run_all(args.seed, args.cell, lambda i, total, label: print(
        f"[{i}/{total}] {label}", file=sys.stderr, flush=True))
    cells = list(dict.fromkeys((r.cell, r.variant) for r in results))
    elapsed = time.perf_counter() - start
    failed = [r for r in results if not r.ok]
    if args.json:
        print(json.dumps([{**r.__dict__, "ok": r.ok} for r in results], indent=2))
    else:
        print(_table(results, args.verbose))
    print(f"{len(results) - len(failed)}/{len(results)} checks passed "
          f"({', '.join(f'{c} {v}' for c, v in cells)}) in {elapsed:.1f} s"
          + (f"; FAILED: {', '.join(_label(r) for r in failed)}" if failed else ""),
          file=sys.stderr if args.json else sys.stdout)
    return 1 if failed else 0


def _label(r) -> str:
    return f"{r.cell} {r.variant} {r.dtype} {r.backend} {r.case}"


def _table(results, verbose) -> str:
    head = ["cell", "variant", "dtype", "backend", "case", "params", "xs", "a0", "c0", "tol",
            "ok"]
    rows = []
    for r in results:
        params = max(v for k, v in r.errors.items() if "." in k)
        cells = [r.cell, r.variant, r.dtype, r.backend, r.case, f"{params:.1e}",
                 f"{r.errors['xs']:.1e}", f"{r.errors['a0']:.1e}",
                 f"{r.errors['c0']:.1e}" if "c0" in r.errors else "-",
                 f"{r.tolerance:.0e}", "ok" if r.ok else "FAIL"]
        rows.append(cells)
        if verbose:
            rows += [["", "", "", "", "", f"{k}: {v:.2e}", "", "", "", "", ""]
                     for k, v in r.errors.items()]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    lines.append("(max relative error |g_bptt - g_autodiff|_max / |g_autodiff|_max, "
                 "params = worst parameter)")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line on stderr, exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _at_least(low, high=2**31 - 1):
    """An argparse type: an integer from low to high."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            message = f"expected an integer >= {low}, got {text!r}"
            raise argparse.ArgumentTypeError(message) from None
        if not low <= value <= high:
            bound = f">= {low}" if value < low else f"<= {high}"
            raise argparse.ArgumentTypeError(f"expected an integer {bound}, got {value}")
        return value
    return parse


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {value}")
    return value


def _directory(text):
    """An argparse type: a directory path, not empty."""
    if not text:
        raise argparse.ArgumentTypeError("expected a directory, got an empty path")
    return text


def _writable_dir(parser, path):
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path):
            pass
    except OSError as e:
        parser.error(f"--out {path} is not a writable directory: {e.strerror or e}")
    return path


def _host_devices(n):
    """``--devices N``: a CPU shows up as N devices (JAX's ``jax_num_cpu_devices``), unless
    XLA_FLAGS sets their number. (Only the CPU's count: it does not add accelerators.)"""
    if n > 1 and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        import jax

        try:
            jax.config.update("jax_num_cpu_devices", n)
        except RuntimeError:  # JAX has started already: check_devices says what it sees
            pass


def _train(args) -> int:
    from jaxbptt import tasks, train

    try:
        tasks.get(args.task, args.T)  # the task's own checks, before --out is made
    except (RuntimeError, ValueError) as e:
        args.parser.error(str(e).replace("T=", "--T ", 1))
    config = train.Config(
        task=args.task, cell=args.cell, hidden=args.hidden, T=args.T, steps=args.steps,
        batch=args.batch, optimizer=args.optimizer, lr=args.lr, clip=args.clip,
        clip_value=args.clip_value, backward=args.backward, seed=args.seed,
        save_every=args.save_every, sample_every=args.sample_every, devices=args.devices)
    _host_devices(args.devices)
    try:
        train.check_devices(config)  # before --out is made
    except ValueError as e:
        args.parser.error(str(e))
    out = _writable_dir(args.parser, args.out if args.out is not None else
                        os.path.join("runs", f"{args.task}-{args.cell}"))
    try:
        summary = train.train(config, out, progress=not args.quiet,
                              exit_on_second_interrupt=True)
    except (checkpoint.CheckpointError, ValueError) as e:
        args.parser.error(str(e))
    except (FloatingPointError, OSError) as e:  # diverged; a save failed (disk full...)
        print(f"{args.parser.prog}: error: {e}", file=sys.stderr)
        return 1
    if summary["interrupted"]:
        print(f"interrupted at step {summary['stopped_at']} of {config.steps}; saved "
              f"{summary['checkpoint']}. Run the same command to resume.", file=sys.stderr)
        return 130
    if summary.get("samples"):
        print("sampled names: " + train.listed(summary["samples"]))
    if summary["resumed_from"] >= config.steps:
        did = ("wrote its missing or damaged history.json and loss.png again from the last "
               "checkpoint" if summary.get("mended") else "nothing to do")
        print(f"{out} already holds {summary['resumed_from']} steps of this run (asked "
              f"{config.steps}); {did}. Pass a larger --steps to train further.")
        return 0
    unit = "MSE" if config.task == "adding" else "nats/symbol"
    window = summary["loss_window"]
    over = "" if window == 1 else f", means of the first and last {window} steps"
    print(f"trained {config.task} {config.cell.upper()} ({config.backward}) steps "
          f"{summary['resumed_from']}->{config.steps}: loss {summary['first_loss']:.4f} -> "
          f"{summary['final_loss']:.4f} {unit}{over} (baseline {summary['baseline']:.4f}) in "
          f"{summary['seconds']:.1f} s; checkpoint {summary['checkpoint']}"
          + (f"; plot {summary['plot']}" if summary["plot"] else
             "; no plot (pip install 'jaxbptt[experiments]' for matplotlib)"))
    return 0


def _sample(args) -> int:
    import jax

    from jaxbptt import tasks, train

    ckpts = checkpoint.list_checkpoints(os.path.join(args.out, "checkpoints"))
    if not ckpts:
        args.parser.error(f"no checkpoint in {args.out}/checkpoints: train one with "
                          f"'jaxbptt train charlm --out {args.out}'")

    def charlm(meta):  # the run's own model, from its checkpoint
        config = train.Config(**meta["config"])
        if config.task != "charlm":
            raise checkpoint.CheckpointError(
                f"sample needs a charlm run; {args.out} holds a run of {config.task}")
        return train.init(config, tasks.get("charlm"))

    try:
        found = checkpoint.restore_latest(os.path.join(args.out, "checkpoints"), charlm)
    except (checkpoint.CheckpointError, RuntimeError) as e:  # (RuntimeError: no 'names')
        args.parser.error(str(e))
    (params, _), manifest = found
    config = train.Config(**manifest["meta"]["config"])
    names = train.sample_names(config, params, jax.random.PRNGKey(args.seed), n=args.n,
                               max_len=args.max_len)
    print("\n".join(names))
    print(f"{len(names)} names sampled from {config.cell.upper()} at step {manifest['step']} "
          f"({args.out})", file=sys.stderr)
    return 0


def _gradflow(args) -> int:
    from jaxbptt import gradflow, train

    out = _writable_dir(args.parser, args.out)
    start = time.perf_counter()

    def bar(total, desc):  # a progress bar on stderr, or nothing with --quiet
        if args.quiet:
            return lambda n, loss=None: None
        b = train.Progress(total, 0, desc)
        return lambda n, loss=None: b.update(n, "" if loss is None else f"loss {loss:.4f}")

    init = gradflow.at_init(T=args.T, seed=args.seed, backward=args.backward,
                            on_done=bar(len(gradflow.INITS), f"gradient flow at init, T={args.T}"))
    maps = {}
    for cell in ("rnn", "lstm", "gru") if args.steps else ():
        maps[cell] = gradflow.during_training(
            cell, T=args.train_T, steps=args.steps, every=max(1, args.steps // 12),
            seed=args.seed, backward=args.backward,
            on_step=bar(args.steps, f"train {cell} on adding (T={args.train_T})"))
    result = {"T": args.T, "backward": args.backward,
              "at_init": {k: {kk: vv.tolist() for kk, vv in v.items()} for k, v in init.items()},
              "training": {c: {"steps": s.tolist(), "norms": n.tolist(), "loss": l.tolist()}
                           for c, (s, n, l) in maps.items()}}
    files = [os.path.join(out, "gradflow.json")]
    checkpoint.write_atomically(files[0], lambda f: json.dump(result, f))
    try:
        files.append(gradflow.plot_at_init(init, os.path.join(out, "gradflow_init.png"), args.T,
                                           args.backward))
        if maps:
            files.append(gradflow.plot_training(maps, os.path.join(out, "gradflow_training.png"),
                                                args.train_T))
    except ImportError:
        print("no plots: pip install 'jaxbptt[experiments]' for matplotlib", file=sys.stderr)
    lags = sorted({0, min(10, args.T - 1), min(50, args.T - 1), args.T - 1})
    print(f"{'mean ||dL_T/da<t>||':<30} " + " ".join(f"lag {lag:>3}" for lag in lags))
    for name, r in init.items():
        a = r["a"][::-1]
        print(f"{name:<30} " + " ".join(f"{a[lag]:.1e}".rjust(7) for lag in lags))
    print(f"gradflow: mean ||dL_T/da<t>|| for {len(init)} initialisations"
          + (f" and {len(maps)} trained cells" if maps else "")
          + f" in {time.perf_counter() - start:.1f} s; wrote {', '.join(files)}")
    return 0


class _Defaults(argparse.HelpFormatter):
    """Every option's help ends with its default, but for flags, required options and
    defaults that the help itself explains (None)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default is None or action.default is False or action.required
                or action.default is argparse.SUPPRESS or "%(default)" in text
                or not action.option_strings):
            return text
        return (text + " " if text else "") + "(default: %(default)s)"


def _parser() -> argparse.ArgumentParser:
    from jaxbptt import check, tasks

    parser = _Parser(
        prog="jaxbptt",
        description="Backpropagation through time with hand-derived gradients, in JAX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    fmt = _Defaults
    p = sub.add_parser(
        "check", help="compare the hand-derived BPTT with jax.grad on every cell and backend",
        description="For every cell and variant, on every JAX backend present, compare the "
        "hand-derived BPTT gradients with jax.grad of the autodiff path under jit, in float64 "
        "(where supported) and float32, over 19 steps: with the default options, and with "
        "lengths, reverse, truncate and residuals='checkpoint'. Exits 1 on a mismatch.", formatter_class=fmt)
    p.add_argument("--cell", action="append", choices=sorted({c for c, _ in check.CELLS}),
                   help="check only this cell (repeatable; default: every cell)")
    p.add_argument("--seed", type=_at_least(0), default=0,
                   help="random seed of the test problems")
    p.add_argument("--verbose", action="store_true", help="also list every gradient's error")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(run=_check, parser=p)

    p = sub.add_parser(
        "train", help="train a recurrent model on a task (resumes a run in --out)",
        description="Train on a task with a jit-compiled optax step. Checkpoints go to "
        "OUT/checkpoints every --save-every steps and at the end; pointing --out at an "
        "existing run resumes it from its last good checkpoint (--steps, --save-every, "
        "--sample-every and --devices may change; the other settings define the run). Ctrl-C "
        "saves the current step and stops. Writes OUT/history.json and OUT/loss.png.",
        formatter_class=fmt)
    p.add_argument("task", choices=tasks.TASKS, help="charlm: names, character by character "
                   "(the course's Dinosaurus model); adding; copy (copy-memory)")
    p.add_argument("--steps", type=_at_least(1), default=2000, help="total training steps")
    p.add_argument("--out", type=_directory, help="run directory (default: runs/TASK-CELL)")
    p.add_argument("--cell", choices=("rnn", "lstm", "gru"), default="rnn", help="recurrent cell")
    p.add_argument("--hidden", type=_at_least(1), default=50, help="hidden size n_a")
    p.add_argument("--batch", type=_at_least(1), default=32, help="sequences per step")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam", help="optax optimizer")
    p.add_argument("--lr", type=_positive_float, default=0.01, help="learning rate")
    p.add_argument("--clip", choices=("value", "norm", "none"), default="value",
                   help="gradient clipping: element-wise (the course), global norm, or none")
    p.add_argument("--clip-value", type=_positive_float, default=5.0,
                   help="the bound of --clip value or norm")
    p.add_argument("--backward", choices=("bptt", "autodiff"), default="bptt",
                   help="hand-derived BPTT or jax autodiff of the same forward")
    p.add_argument("--seed", type=_at_least(0), default=0, help="random seed")
    p.add_argument("--T", type=_at_least(0), default=0,
                   help="sequence length of adding / delay of copy (0: task default 50 / 20)")
    p.add_argument("--save-every", type=_at_least(1), default=500,
                   help="steps between checkpoints")
    p.add_argument("--sample-every", type=_at_least(0), default=500,
                   help="print sampled names every N steps and at the end (charlm; 0: never)")
    p.add_argument("--devices", type=_at_least(1), default=1,
                   help="data parallel over this many devices (batch split, params replicated; "
                   "on a CPU, N host devices over its cores, unless XLA_FLAGS="
                   "--xla_force_host_platform_device_count sets their number)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_train, parser=p)

    p = sub.add_parser("sample", help="sample names from a charlm run",
                       description="Sample names, character by character, from the last "
                       "checkpoint of a 'jaxbptt train charlm' run.", formatter_class=fmt)
    p.add_argument("--out", type=_directory, required=True,
                   help="the run directory of 'jaxbptt train charlm'")
    p.add_argument("--n", type=_at_least(1), default=10, help="how many names")
    p.add_argument("--max-len", type=_at_least(1), default=20, help="longest name")
    p.add_argument("--seed", type=_at_least(0), default=0, help="random seed")
    p.set_defaults(run=_sample, parser=p)

    p = sub.add_parser(
        "gradflow", help="plot ||dL_T/da<t>|| against T - t at init and during training",
        description="Measure the per-step adjoints dL_T/da<t> (from the reverse scan, via the "
        "probe) for RNN (Gaussian vs orthogonal init), LSTM (forget bias 0 vs 1) and GRU at "
        "initialisation, and while training each cell on the adding task. Writes "
        "OUT/gradflow_init.png, OUT/gradflow_training.png and OUT/gradflow.json.",
        formatter_class=fmt)
    p.add_argument("--T", type=_at_least(2), default=100, help="sequence length at init")
    p.add_argument("--steps", type=_at_least(0), default=240,
                   help="training steps for the heat map (0: skip training)")
    p.add_argument("--train-T", type=_at_least(2), default=50, help="adding-task length")
    p.add_argument("--backward", choices=("bptt", "autodiff"), default="bptt",
                   help="hand-derived BPTT or jax autodiff of the same forward")
    p.add_argument("--seed", type=_at_least(0), default=0, help="random seed")
    p.add_argument("--out", type=_directory, default=os.path.join("runs", "gradflow"),
                   help="output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(run=_gradflow, parser=p)
    return parser


def _one_line(message, category, filename, lineno, line=None):
    return f"warning: {message}\n"


def _exit_at_once(signum, frame):
    """Ctrl-C outside a training loop: exit, status 130. Raising KeyboardInterrupt while
    JAX imports or compiles can crash the process or be lost in a callback; the files the
    commands write are written whole (a temporary renamed into place) or not at all."""
    checkpoint.exit_at_once("\njaxbptt: interrupted\n")


@contextlib.contextmanager
def _ctrl_c_exits():
    """Within it, SIGINT calls `_exit_at_once` (`jaxbptt.train` installs its own handler
    around a run, which saves before it stops)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _exit_at_once)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv=None) -> int:
    with _ctrl_c_exits():
        args = _parser().parse_args(argv)
        warnings.formatwarning = _one_line  # a user of the CLI needs the message, not our line
        return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
