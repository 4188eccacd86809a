"""Self-check: the hand-derived BPTT against ``jax.grad`` of the same forward.

For every cell and variant, on every platform JAX sees, in float64 (where the
platform has it) and float32: a random problem of 19 steps (for the LSTM and GRU,
chunks of 8, 8 and a shorter 3), the loss ``sum(hs * w) + sum(state_T * v)``
(cotangents on every output), and the normwise relative error
``max|g_bptt - g_autodiff| / max|g_autodiff|`` of each gradient, both computed under
``jit``; once with the default options and once with the sequence options and a
residual policy (`CASES`). Used by ``jaxbptt check``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxbptt.gru import gru, init_gru
from jaxbptt.lstm import LSTMState, init_lstm, lstm
from jaxbptt.rnn import init_rnn, rnn

#: (cell, variant) pairs the library implements.
CELLS = (("rnn", "tanh"), ("lstm", "course"), ("gru", "course"), ("gru", "cudnn"))
#: The options of each case: the defaults, and a ragged batch (lengths 19, 15, 1) run in
#: reverse, truncated every 5 steps, with `"checkpoint"` over chunks of 4 (4 and a last of 3).
CASES = {"default": {}, "options": dict(reverse=True, truncate=5, residuals="checkpoint",
                                        chunk=4)}
#: Largest normwise relative error accepted, by dtype.
TOLERANCE = {"float64": 1e-12, "float32": 2e-5}


@dataclasses.dataclass
class Result:
    cell: str
    variant: str
    dtype: str
    backend: str
    case: str  # a key of CASES
    errors: dict  # gradient name -> relative error
    tolerance: float

    @property
    def worst(self) -> float:
        """The largest error; NaN if any is (Python's max would pass it over)."""
        return float(np.max(list(self.errors.values())))

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.worst) and self.worst <= self.tolerance)


def problem(cell, variant, dtype, key, T=19, B=3, n_x=4, n_a=5):
    """``(fn, params, xs, state0)`` for a random, non-saturated problem."""
    ks = jax.random.split(key, 5)
    if cell == "rnn":
        fn, params = rnn, init_rnn(ks[0], n_x, n_a, dtype)
    elif cell == "lstm":
        fn, params = lstm, init_lstm(ks[0], n_x, n_a, dtype)
    else:
        fn, params = gru, init_gru(ks[0], n_x, n_a, dtype, variant=variant)
    # Random biases too, so that no gradient is trivially zero.
    leaves, tree = jax.tree.flatten(params)
    noise = jax.random.split(ks[1], len(leaves))
    params = jax.tree.unflatten(tree, [
        x + 0.5 * jax.random.normal(k, x.shape, dtype) for x, k in zip(leaves, noise)])
    xs = jax.random.normal(ks[2], (T, B, n_x), dtype)
    a0 = 0.5 * jax.random.normal(ks[3], (B, n_a), dtype)
    state0 = LSTMState(a0, 0.5 * jax.random.normal(ks[4], (B, n_a), dtype)) if cell == "lstm" else a0
    return fn, params, xs, state0


def lengths_for(case, xs):
    """The case's lengths (B,): T, T - 4, 1, ... (None for the default case)."""
    if case == "default":
        return None
    T, B = xs.shape[:2]
    return jnp.array([T, T - 4, 1] * B, jnp.int32)[:B]


def gradients(fn, params, xs, state0, backward, key, **options):
    """jit(grad) of sum(hs * w) + sum(state_T * v) w.r.t. (params, xs, state0), with
    ``options`` passed to ``fn``."""
    hs, state_T = jax.eval_shape(lambda *a: fn(*a, **options), params, xs, state0)
    kw, kv = jax.random.split(key)
    w = jax.random.normal(kw, hs.shape, hs.dtype)
    vs = [jax.random.normal(k, s.shape, s.dtype)
          for k, s in zip(jax.random.split(kv, 2), jax.tree.leaves(state_T))]

    def loss(params, xs, state0):
        hs, state_T = fn(params, xs, state0, backward=backward, **options)
        return jnp.sum(hs * w) + sum(jnp.sum(s * v) for s, v in zip(jax.tree.leaves(state_T), vs))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, xs, state0)


def relative_error(x, ref) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    scale = np.max(np.abs(ref))
    return float(np.max(np.abs(x - ref)) / scale) if scale > 0 else float(np.max(np.abs(x)))


def devices():
    """One device per platform present (CPU always; GPU/TPU when attached)."""
    found = []
    for platform in ("cpu", "gpu", "tpu"):
        try:
            found.append(jax.devices(platform)[0])
        except RuntimeError:
            pass
    return found


def dtypes_for(device):
    """float64 where the platform supports it (not TPU) and x64 is on, and float32."""
    has_f64 = device.platform != "tpu" and jax.config.jax_enable_x64
    return ("float64", "float32") if has_f64 else ("float32",)


def check_one(cell, variant, dtype, device, seed=0, case="default") -> Result:
    key = jax.random.PRNGKey(seed)
    with jax.default_device(device):
        fn, params, xs, state0 = problem(cell, variant, jnp.dtype(dtype), key)
        args = jax.device_put((params, xs, state0), device)
        options = dict(CASES[case], lengths=lengths_for(case, xs))
        g_bptt = gradients(fn, *args, "bptt", key, **options)
        g_auto = gradients(fn, *args, "autodiff", key, **options)
    names = [f"{type(params).__name__}.{f}" for f, v in params._asdict().items() if v is not None]
    names += ["xs"] + (["a0", "c0"] if cell == "lstm" else ["a0"])
    errors = {n: relative_error(a, b) for n, a, b in
              zip(names, jax.tree.leaves(g_bptt), jax.tree.leaves(g_auto), strict=True)}
    return Result(cell, variant, dtype, device.platform, case, errors, TOLERANCE[dtype])


def run_all(seed=0, cells=None, progress=None):
    """Every cell x variant x platform x dtype x case, or only the cells named in
    ``cells``; ``progress(i, total, label)`` is called before each check."""
    todo = [(cell, variant, dtype, device, case) for device in devices()
            for dtype in dtypes_for(device) for case in CASES for cell, variant in CELLS
            if not cells or cell in cells]
    results = []
    for i, (cell, variant, dtype, device, case) in enumerate(todo):
        if progress is not None:
            progress(i + 1, len(todo), f"{cell} {variant} {dtype} {device.platform} {case}")
        results.append(check_one(cell, variant, dtype, device, seed, case))
    return results
