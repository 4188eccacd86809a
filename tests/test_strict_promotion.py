"""The library mixes no dtypes implicitly: it runs under JAX's strict dtype promotion.

A user who turns on ``jax_numpy_dtype_promotion="strict"`` (as equinox's tests do)
must not meet a TypePromotionError from inside jaxbptt, e.g. between int32 time
indices and int64 lengths, or a float32 constant and float64 states.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbptt as jb
from cells import cotangents, make, rel_err, sweep

OPTIONS = {
    "default": {},
    "lengths-int64-reverse-truncate": dict(lengths=np.array([7, 3]), reverse=True, truncate=2),
    "lengths-int32-padded-chunk": dict(lengths=jnp.array([7, 2], jnp.int32), chunk=3),
    "states": dict(residuals="states", chunk=4),
    "checkpoint-slots": dict(residuals="checkpoint", chunk=2, slots=2),
    "budget": dict(residuals=1 << 20),
}


@pytest.mark.parametrize("cell,options", sweep(OPTIONS, in_ci=("lstm",)))
def test_strict_dtype_promotion(cell, options):
    fn, params, xs, state0 = make(cell, 7, 2, 3, 4)
    dhs, dfin = cotangents(fn, params, xs, state0)
    kw = OPTIONS[options]
    probe = jax.tree.map(lambda s: jnp.zeros((7,) + s.shape, s.dtype), state0)

    def loss(params, xs, state0, probe, backward):
        hs, fin = fn(params, xs, state0, backward=backward, probe=probe, **kw)
        return jnp.sum(hs * dhs) + sum(jnp.sum(a * b) for a, b in
                                       zip(jax.tree.leaves(fin), jax.tree.leaves(dfin)))

    with jax.numpy_dtype_promotion("strict"):
        grads = {b: jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)), static_argnums=4)(
            params, xs, state0, probe, b) for b in ("bptt", "autodiff")}
    assert rel_err(grads["bptt"], grads["autodiff"]) < 1e-12


def test_strict_dtype_promotion_stack_and_loss():
    layers = (jb.Bidirectional(make("lstm", 6, 2, 3, 4)[1], make("lstm", 6, 2, 3, 4, seed=1)[1]),
              jb.Bidirectional(make("lstm", 6, 2, 8, 4)[1], make("lstm", 6, 2, 8, 4, seed=1)[1]))
    xs = make("lstm", 6, 2, 3, 4)[2]
    out = jb.init_output(jax.random.PRNGKey(0), 8, 5, jnp.float64)
    labels = jnp.asarray(np.arange(12).reshape(6, 2) % 6 - 1)  # -1 and 5: outside the classes

    def loss(layers, out, backward):
        ys, _ = jb.stack(layers, xs, lengths=jnp.array([6, 4]), backward=backward)
        return jb.cross_entropy(out, ys, labels, backward=backward)

    with jax.numpy_dtype_promotion("strict"):
        grads = {b: jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(layers, out, b)
                 for b in ("bptt", "autodiff")}
    assert rel_err(grads["bptt"], grads["autodiff"]) < 1e-12
