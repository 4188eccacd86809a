"""The hand-derived BPTT equals jax.grad of the same forward, for every cell."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cells import CELLS, cell_object, cotangents, loss_fn, make, rel_err
from jaxbptt import _driver

LONG = (263, 2, 3, 4)
SHAPES = [  # (T, B, n_x, n_a)
    (1, 1, 1, 1),
    (1, 3, 2, 4),
    (5, 1, 1, 3),
    (7, 4, 3, 5),
    LONG,  # several chunks at the default sizes and a short last one (test below)
    pytest.param((12, 2, 6, 3), marks=pytest.mark.slow),
]
TOL = {np.float64: 1e-12, np.float32: 2e-5}


def _grads(cell, shape, dtype, target, backward, device, use_jit=True):
    fn, params, xs, state0 = make(cell, *shape, dtype=dtype)
    args = jax.device_put((params, xs, state0), device)
    loss = loss_fn(fn, *args, target=target, backward=backward)
    grad = jax.grad(loss, argnums=(0, 1, 2))
    return (jax.jit(grad) if use_jit else grad)(*args)


def _vjp(cell, shape, dtype, backward, device):
    """jit'd cotangents (dhs, dstate_T) -> gradients of (params, xs, state0)."""
    fn, params, xs, state0 = make(cell, *shape, dtype=dtype)
    args = jax.device_put((params, xs, state0), device)
    pullback = jax.jit(lambda args, ct: jax.vjp(
        lambda *a: fn(*a, backward=backward), *args)[1](ct))
    return args, functools.partial(pullback, args)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("cell", CELLS)
def test_float64_jit(cell, shape, device):
    # Cotangents on hs only, on the final state only, and on both.
    args, manual = _vjp(cell, shape, np.float64, "bptt", device)
    _, auto = _vjp(cell, shape, np.float64, "autodiff", device)
    dhs, dstate = cotangents(make(cell, *shape)[0], *args)
    zero_h = jnp.zeros_like(dhs)
    zero_s = jax.tree.map(jnp.zeros_like, dstate)
    for ct in [(dhs, zero_s), (zero_h, dstate), (dhs, dstate)]:
        assert rel_err(manual(ct), auto(ct)) < TOL[np.float64]


@pytest.mark.parametrize("cell", CELLS)
def test_long_shape_spans_several_chunks_and_a_short_last_one(cell):
    T, B, _, n_a = LONG
    K = _driver.chunk_size(T, _driver.Options(
        default_chunk=_driver.default_chunk(cell_object(cell), B, n_a, jnp.float64)))
    assert 2 * K < T and T % K != 0, (cell, K)


@pytest.mark.parametrize("cell", CELLS)
def test_float64_eager(cell, device):
    manual = _grads(cell, (4, 3, 2, 5), np.float64, "both", "bptt", device, use_jit=False)
    auto = _grads(cell, (4, 3, 2, 5), np.float64, "both", "autodiff", device, use_jit=True)
    assert rel_err(manual, auto) < TOL[np.float64]


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (9, 4, 3, 6), (37, 4, 3, 6)], ids=str)
@pytest.mark.parametrize("cell", CELLS)
def test_float32_jit(cell, shape, device):  # 37: the gated cells' chunks of 8, a short last one
    manual = _grads(cell, shape, np.float32, "both", "bptt", device)
    auto = _grads(cell, shape, np.float32, "both", "autodiff", device)
    assert all(g.dtype == np.float32 for g in jax.tree.leaves(manual))
    assert rel_err(manual, auto) < TOL[np.float32]


@pytest.mark.parametrize("cell", CELLS)
def test_gradients_reach_every_argument(cell, device):
    # Every entry of every parameter, input and initial state gets a nonzero gradient
    # (nothing dropped: no block of a weight, step of xs or row of a state; c0 included),
    # and the forward of the two modes is the same.
    fn, params, xs, state0 = make(cell, 19, 3, 2, 4)  # several chunks but the RNN's
    grads = _grads(cell, (19, 3, 2, 4), np.float64, "both", "bptt", device)
    for g in jax.tree.leaves(grads):
        assert float(jnp.min(jnp.abs(g))) > 1e-6
    out_b = fn(params, xs, state0, backward="bptt")
    out_a = fn(params, xs, state0, backward="autodiff")
    assert rel_err(out_b, out_a) == 0.0


@pytest.mark.parametrize("cell", CELLS)
def test_loss_of_final_state_only_reaches_all_steps(cell):
    # With a cotangent on the final state only, the gradient of the first input is
    # nonzero: the reverse scan carries it through every step.
    fn, params, xs, state0 = make(cell, 6, 2, 3, 4)
    dxs = jax.grad(loss_fn(fn, params, xs, state0, target="final"), argnums=1)(params, xs, state0)
    assert float(jnp.max(jnp.abs(dxs[0]))) > 1e-8
