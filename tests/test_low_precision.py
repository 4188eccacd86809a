"""bfloat16 and float16: the hand-derived gradients keep the dtype of the inputs and are
no less accurate than JAX's autodiff in the same dtype; the summed cross-entropy does not
overflow.

Both gradients are measured against float64 gradients of the same problem at the same
rounded inputs, so that only the arithmetic of the backward differs. (Measured over four
seeds and every cell at this shape, the hand-derived error is 0.54-0.82x autodiff's; the
weight gradients are summed over the chunks in float32, and without that, one-step
sub-chunks of nested checkpointing gave 1.4-2.4x.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbptt as jb
from cells import CELLS, make

BOUND = {"bfloat16": 2e-2, "float16": 3e-3}  # observed: about 1e-2 and 1.2e-3


def _l2_err(a, b):
    a = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(a)])
    b = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(b)])
    assert np.all(np.isfinite(a))
    return np.linalg.norm(a - b) / np.linalg.norm(b)


OPTIONS = {"default": {}, "nested": dict(residuals="checkpoint", chunk=(8, 1))}


@pytest.mark.parametrize("dtype", sorted(BOUND))
@pytest.mark.parametrize("cell,options", [
    (c, o) if c == "lstm" else pytest.param(c, o, marks=pytest.mark.slow)
    for c in CELLS for o in OPTIONS])
def test_low_precision_gradients(cell, options, dtype):
    # "nested": the weight gradients of T one-step sub-chunks, summed (in float32).
    fn, params, xs, state0 = make(cell, 64, 8, 8, 32)
    w = jnp.asarray(np.random.default_rng(7).normal(size=(64, 8, 32)))
    low = jax.tree.map(lambda x: x.astype(dtype), (params, xs, state0))
    exact = jax.tree.map(lambda x: x.astype(np.float64), low)

    def loss(params, xs, state0, backward):
        hs = fn(params, xs, state0, backward=backward, **OPTIONS[options])[0]
        return jnp.sum(hs.astype(np.float64) * w)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    truth = grad(*exact, "autodiff")
    manual, auto = grad(*low, "bptt"), grad(*low, "autodiff")
    assert all(g.dtype == jnp.dtype(dtype) for g in jax.tree.leaves(manual))
    err_manual, err_auto = _l2_err(manual, truth), _l2_err(auto, truth)
    assert err_manual <= 1.1 * err_auto, (err_manual, err_auto)
    assert err_manual < BOUND[dtype], err_manual


def test_cross_entropy_sum_does_not_overflow_in_float16():
    # 6144 positions of about 12 nats: 7.6e4, past float16's largest, 65504. The sum is
    # float32; the gradients stay float16 and finite, in both backwards.
    rng = np.random.default_rng(0)
    hs = jnp.asarray(rng.normal(size=(64, 96, 16)) * 3, np.float16)
    out = jb.OutputParams(jnp.asarray(rng.normal(size=(20, 16)), np.float16),
                          jnp.zeros((20,), np.float16))
    labels = jnp.asarray(rng.integers(0, 20, (64, 96)))
    exact = jb.cross_entropy(jax.tree.map(lambda x: x.astype(np.float64), out),
                             hs.astype(np.float64), labels)
    assert exact > 65504
    for backward in ("bptt", "autodiff"):
        loss, grads = jax.value_and_grad(
            lambda o, h: jb.cross_entropy(o, h, labels, backward=backward),
            argnums=(0, 1))(out, hs)
        assert loss.dtype == jnp.float32 and abs(loss / exact - 1) < 1e-3, (backward, loss)
        assert all(g.dtype == jnp.float16 and bool(jnp.all(jnp.isfinite(g)))
                   for g in jax.tree.leaves(grads))
