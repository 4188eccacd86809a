"""How gradients flow through time: ‖∂L_T/∂a<t>‖ against the lag T - t.

The hand-derived backward computes the adjoint dL/d(state<t>) of every step on its
way back; the ``probe=`` keyword of `jaxbptt.rnn`/`lstm`/`gru` hands it out (the
gradient of a zero array added to the states). This module measures it

* at initialisation, for a loss on the last step only (L_T = Σ_b u·a<T>_b, u a
  random unit vector, so that ‖∂L_T/∂a<T>‖ = 1), for the tanh RNN with Gaussian vs orthogonal recurrent
  weights, the LSTM with forget-gate bias 0 vs 1, and both GRUs: vanishing and
  exploding gradients (Bengio et al. 1994; Pascanu et al. 2013);
* during training on the adding task, whose loss sits on the last step, as a
  heat map over training steps.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxbptt import _checks, checkpoint, tasks, train
from jaxbptt.gru import gru, init_gru
from jaxbptt.lstm import init_lstm, lstm
from jaxbptt.rnn import RNNParams, rnn

#: Initialisations compared at step 0: name -> (cell fn, init(key, n_x, n_a)).
INITS = {
    "RNN, Gaussian Waa (σ²=1/n_a)": (rnn, lambda k, n_x, n_a: _rnn_init(k, n_x, n_a, "gaussian")),
    "RNN, Gaussian Waa (σ²=2/n_a)": (rnn, lambda k, n_x, n_a: _rnn_init(k, n_x, n_a, "gaussian", 2.0)),
    "RNN, orthogonal Waa": (rnn, lambda k, n_x, n_a: _rnn_init(k, n_x, n_a, "orthogonal")),
    "LSTM, forget bias 0": (lstm, lambda k, n_x, n_a: init_lstm(k, n_x, n_a, forget_bias=0.0)),
    "LSTM, forget bias 1": (lstm, lambda k, n_x, n_a: init_lstm(k, n_x, n_a, forget_bias=1.0)),
    "GRU (course)": (gru, lambda k, n_x, n_a: init_gru(k, n_x, n_a)),
    "GRU (cuDNN)": (gru, lambda k, n_x, n_a: init_gru(k, n_x, n_a, variant="cudnn")),
}


def _rnn_init(key, n_x, n_a, kind, variance=1.0):
    kx, ka = jax.random.split(key)
    Wax = jax.random.normal(kx, (n_a, n_x), jnp.float32) / math.sqrt(n_x)
    if kind == "orthogonal":
        Waa = jax.nn.initializers.orthogonal()(ka, (n_a, n_a), jnp.float32)
    else:
        Waa = jax.random.normal(ka, (n_a, n_a), jnp.float32) * math.sqrt(variance / n_a)
    return RNNParams(Wax, Waa, jnp.zeros((n_a,), jnp.float32))


def zeros_probe(state0, T):
    """Zeros shaped like the states over time: the probe whose gradient is the adjoint."""
    return jax.tree.map(lambda s: jnp.zeros((T,) + s.shape, s.dtype), state0)


def _mean_norm(d):
    """(T, B, n) adjoints -> (T,) mean over the batch of their norms, taken in float64:
    in float32 the squares of adjoints below about 1e-19 underflow, and the norm to 0."""
    return np.mean(np.linalg.norm(np.asarray(d, np.float64), axis=-1), axis=1)


def adjoint_norms(fn, params, xs, *, backward="bptt", seed=0):
    """Mean over the batch of ‖∂L_T/∂a<t>‖ (and ‖∂L_T/∂c<t>‖ for the LSTM), for every t.

    L_T = Σ_b u·a<T>_b with u a random unit vector: a loss on the last step only,
    whose adjoint has norm 1 at the last step.
    Returns a dict with "a" (T,) and, for the LSTM, "c" (T,).
    """
    shape, _ = _checks.shape_dtype("xs", xs)
    if len(shape) != 3:
        raise ValueError(f"xs must have rank 3 with shape (T, B, n_x), got shape {shape}")
    T = shape[0]
    _, state_T = jax.eval_shape(fn, params, xs)
    state0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state_T)
    n_a = jax.tree.leaves(state0)[0].shape[-1]
    u = jax.random.normal(jax.random.PRNGKey(seed), (n_a,), xs.dtype)
    u = u / jnp.linalg.norm(u)

    @jax.jit
    def norms(params, xs):
        def loss(probe):
            hs, _ = fn(params, xs, state0, probe=probe, backward=backward)
            return jnp.sum(hs[-1] @ u)

        return jax.grad(loss)(zeros_probe(state0, T))

    out = jax.tree.map(_mean_norm, norms(params, xs))
    if hasattr(out, "c"):
        return {"a": np.asarray(out.a), "c": np.asarray(out.c)}
    return {"a": np.asarray(out)}


def at_init(T=100, B=32, n_x=8, n_a=64, seed=0, backward="bptt", input_scale=0.5,
            on_done=None):
    """``{name: {"a": (T,), ...}}`` for every initialisation in `INITS`.

    Inputs are N(0, input_scale²): small enough that the tanh units are not
    saturated at the start, so the recurrent weights decide the flow.
    ``on_done(i)``, if given, is called after the i-th initialisation (1, 2, ...).
    """
    for name, n in (("T", T), ("B", B), ("n_x", n_x), ("n_a", n_a)):
        _checks.positive_int(name, n)
    xs = input_scale * jax.random.normal(jax.random.PRNGKey(seed + 1), (T, B, n_x), jnp.float32)
    results = {}
    for i, (name, (fn, make)) in enumerate(INITS.items()):
        params = make(jax.random.PRNGKey(seed * 100 + i), n_x, n_a)
        results[name] = adjoint_norms(fn, params, xs, backward=backward, seed=seed)
        if on_done is not None:
            on_done(i + 1)
    return results


def during_training(cell, T=50, steps=300, every=25, hidden=32, batch=32, seed=0,
                    backward="bptt", lr=0.01, on_step=None):
    """Trains ``cell`` on the adding task; every ``every`` steps records the mean
    ‖∂L/∂a<t>‖ of the training loss. Returns (steps (K,), norms (K, T), losses).
    ``on_step(step, loss)``, if given, is called after each training step (1, 2, ...)."""
    if cell not in train.CELLS:
        raise ValueError(f"cell must be one of {', '.join(map(repr, train.CELLS))}, got {cell!r}")
    for name, n in (("T", T), ("every", every), ("hidden", hidden), ("batch", batch)):
        _checks.positive_int(name, n)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    config = train.Config(task="adding", cell=cell, hidden=hidden, T=T, steps=steps, batch=batch,
                          lr=lr, clip="norm", clip_value=1.0, backward=backward, seed=seed)
    task = tasks.get("adding", T)
    params, opt_state = train.init(config, task)
    step_fn = train.make_step(config, task)
    probe_batch = jax.tree.map(lambda x: None if x is None else jnp.asarray(x),
                               task.batch(seed + 1, 10**6, batch))

    @jax.jit
    def norms(params):
        _, state_T = jax.eval_shape(train.CELLS[cell][0], params["cell"], probe_batch.xs)
        probe = jax.tree.map(lambda s: jnp.zeros((T,) + s.shape, s.dtype), state_T)
        g = jax.grad(lambda p: train.loss_fn(config, task, params, probe_batch, p))(probe)
        return g.a if hasattr(g, "a") else g

    recorded, rows, losses = [], [], []
    for step in range(steps + 1):
        if step % every == 0:
            recorded.append(step)
            rows.append(_mean_norm(norms(params)))
        if step == steps:
            break
        b = jax.tree.map(lambda x: None if x is None else jnp.asarray(x),
                         task.batch(seed, step, batch))
        params, opt_state, loss = step_fn(params, opt_state, b)
        losses.append(float(loss))
        if on_step is not None:
            on_step(step + 1, losses[-1])
    return np.asarray(recorded), np.stack(rows), np.asarray(losses)


def plot_at_init(results, path, T, backward="bptt"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    lag = np.arange(T)
    for name, r in results.items():
        norms = r["a"][::-1]  # index by lag T-1-t
        ax.semilogy(lag, np.maximum(norms, 1e-300), lw=2, label=name)
    ax.set(xlabel="lag T − t (steps back from the loss)",
           ylabel="mean ‖∂L_T / ∂a⟨t⟩‖ (log scale)",
           title=f"Gradient flow at initialisation (T={T}, backward={backward}, probe adjoints)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    checkpoint.write_atomically(path, lambda f: fig.savefig(f, format="png"), "wb")
    plt.close(fig)
    return path


def plot_training(maps, path, T):
    """One heat map per cell: training step (rows) × lag (columns), log10 of the norm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(maps), figsize=(5 * len(maps), 4.2), dpi=110, squeeze=False)
    logs = {c: np.log10(np.maximum(n[:, ::-1], 1e-30)) for c, (_, n, _) in maps.items()}
    lo = min(float(np.min(v)) for v in logs.values())
    hi = max(float(np.max(v)) for v in logs.values())
    for ax, (cell, (steps, _, _)) in zip(axes[0], maps.items()):
        im = ax.imshow(logs[cell], aspect="auto", origin="lower", cmap="viridis", vmin=lo, vmax=hi,
                       extent=(-0.5, T - 0.5, steps[0], steps[-1]))
        ax.set(xlabel="lag T − t", ylabel="training step",
               title=f"{cell.upper()} on adding (T={T})")
        fig.colorbar(im, ax=ax, label="log10 mean ‖∂L/∂a⟨t⟩‖")
    fig.suptitle("Gradient flow during training (loss on the last step)")
    fig.tight_layout()
    checkpoint.write_atomically(path, lambda f: fig.savefig(f, format="png"), "wb")
    plt.close(fig)
    return path
