"""The hand-derived BPTT against central finite differences (float64).

``order=2`` also checks reverse-over-reverse: jax differentiates the
hand-written backward rule itself.
"""

import jax
import pytest
from jax.test_util import check_grads

from cells import CELLS, loss_fn, make


@pytest.mark.parametrize("cell", CELLS)
def test_check_grads(cell):
    fn, params, xs, state0 = make(cell, 4, 2, 3, 3)
    loss = jax.jit(loss_fn(fn, params, xs, state0, backward="bptt"))
    check_grads(loss, (params, xs, state0), order=2, modes=("rev",), eps=1e-6)
