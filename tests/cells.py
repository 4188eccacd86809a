"""Random problems for every cell, shared by the tests (not a test module).

Arrays are drawn with NumPy (no JAX compilation), then handed to JAX.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbptt as jb
from jaxbptt import memory

CELLS = ("rnn", "lstm", "gru-course", "gru-cudnn")
FN = {"rnn": jb.rnn, "lstm": jb.lstm, "gru-course": jb.gru, "gru-cudnn": jb.gru}


def sweep(options, in_ci=("lstm", "gru-cudnn")):
    """``(cell, option-set name)`` pairs for ``pytest.mark.parametrize("cell,options")``:
    every cell with the first (default) set, and the other sets for the cells ``in_ci``;
    the rest are marked slow (``--runslow``)."""
    first = next(iter(options))
    return [(cell, name) if name == first or cell in in_ci else
            pytest.param(cell, name, marks=pytest.mark.slow)
            for cell in CELLS for name in options]


def cells(slow=("gru-course",)):
    """CELLS for ``pytest.mark.parametrize("cell")``, those in ``slow`` marked slow: for
    driver options that no cell handles on its own (the course GRU differs from the cuDNN
    form in its step only)."""
    return [pytest.param(c, marks=pytest.mark.slow) if c in slow else c for c in CELLS]


def params(cell, n_x, n_a, dtype=np.float64, seed=0):
    """Random params of every field (biases too), scaled to keep the gates unsaturated."""
    rng = np.random.default_rng(seed)

    def W(*shape):
        return jnp.asarray(rng.normal(0, 1 / np.sqrt(shape[-1]), shape).astype(dtype))

    def b():
        return jnp.asarray(rng.normal(0, 0.5, (n_a,)).astype(dtype))

    if cell == "rnn":
        return jb.RNNParams(W(n_a, n_x), W(n_a, n_a), b())
    if cell == "lstm":
        return jb.LSTMParams(*(f() for _ in range(4) for f in (lambda: W(n_a, n_a + n_x), b)))
    fields = [f() for _ in range(3) for f in (lambda: W(n_a, n_a + n_x), b)]
    return jb.GRUParams(*fields, bch=b() if cell == "gru-cudnn" else None)


def make(cell, T, B, n_x, n_a, dtype=np.float64, seed=0):
    """``(fn, params, xs, state0)`` with random params, inputs and initial state."""
    rng = np.random.default_rng(seed + 1000)
    xs = jnp.asarray(rng.normal(size=(T, B, n_x)).astype(dtype))
    a0 = jnp.asarray(0.5 * rng.normal(size=(B, n_a)).astype(dtype))
    if cell == "lstm":
        state0 = jb.LSTMState(a0, jnp.asarray(0.5 * rng.normal(size=(B, n_a)).astype(dtype)))
    else:
        state0 = a0
    return FN[cell], params(cell, n_x, n_a, dtype, seed), xs, state0


def cotangents(fn, params, xs, state0, seed=1):
    """Random (dhs, dstate_T) shaped like fn's outputs."""
    rng = np.random.default_rng(seed)
    out = jax.eval_shape(fn, params, xs, state0)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape).astype(s.dtype)), out)


def vjp(f, args, cts, **kw):
    """``(f(*args, **kw), the gradients of args for the cotangents cts)``, in one jit."""
    def both(args, cts):
        out, pull = jax.vjp(lambda *a: f(*a, **kw), *args)
        return out, pull(cts)
    return jax.jit(both)(args, cts)


def loss_fn(fn, params, xs, state0, target="both", backward="bptt", seed=1, **options):
    """loss(params, xs, state0): random cotangents on hs, the final state, or both;
    ``options`` go to ``fn`` (lengths=, truncate=, residuals=...)."""
    w, v = cotangents(fn, params, xs, state0, seed)

    def loss(params, xs, state0):
        hs, state_T = fn(params, xs, state0, backward=backward, **options)
        on_hs = jnp.sum(hs * w)
        on_final = sum(jnp.sum(s * c) for s, c in zip(jax.tree.leaves(state_T), jax.tree.leaves(v)))
        return {"hs": on_hs, "final": on_final, "both": on_hs + on_final}[target]

    return loss


def rel_err(a, b):
    """Normwise relative error max|a - b| / max|b|, worst over the leaf pairs."""
    worst = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.shape == y.shape and x.dtype == y.dtype, (x.shape, y.shape, x.dtype, y.dtype)
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        scale = np.max(np.abs(y))
        err = np.max(np.abs(x - y))
        if not np.isfinite(err):  # a NaN or inf in either is never close (and Python's
            return float("inf")  # max() would drop a NaN)
        worst = max(worst, err / scale if scale > 0 else err)
    return worst


def cell_object(cell):
    """The driver's cell object behind a name of `CELLS` (its class holds the step rules)."""
    return memory.cell_of(params(cell, 1, 1))[0]


@contextlib.contextmanager
def broken_backward(monkeypatch, cell, change):
    """Within it, the hand-derived step backward of ``cell`` (a name of `CELLS`) returns
    ``change(d_prev, dz)`` of what it returned (JAX's caches cleared on entry and exit)."""
    cls = type(cell_object(cell))
    good = cls.step_bwd
    monkeypatch.setattr(cls, "step_bwd", staticmethod(lambda *args: change(*good(*args))))
    jax.clear_caches()
    try:
        yield
    finally:
        monkeypatch.undo()
        jax.clear_caches()
