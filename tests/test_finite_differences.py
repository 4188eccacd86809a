"""The hand-derived BPTT against central finite differences (float64).

``order=2`` also checks reverse-over-reverse: jax differentiates the
hand-written backward rule itself.
"""

import jax
import jax.numpy as jnp
import pytest
from jax.test_util import check_grads

from cells import loss_fn, make, sweep

# Central differences with eps = 1e-6 are good to about eps² + 1e-16/eps; every
# cell agrees to 1e-8 or better, so that is the tolerance (check_grads' float64
# default, 1e-5, would let a wrong term of that size through). (truncate= is not
# checked here: a truncated gradient is by design not the forward's derivative.)
TOL = 1e-7

OPTIONS = {
    "default": {},
    "lengths-reverse": dict(lengths=jnp.array([5, 2]), reverse=True),
    "checkpoint": dict(residuals="checkpoint", chunk=2),
}


@pytest.mark.parametrize("cell,options", sweep(OPTIONS))
def test_check_grads(cell, options):
    fn, params, xs, state0 = make(cell, 5, 2, 3, 3)
    loss = jax.jit(loss_fn(fn, params, xs, state0, backward="bptt", **OPTIONS[options]))
    check_grads(loss, (params, xs, state0), order=2, modes=("rev",), eps=1e-6,
                atol=TOL, rtol=TOL)
