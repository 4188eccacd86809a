"""The gradients of ``backward="bptt"`` come from the cells' hand-derived step backward, for
every cell and every residual policy: scaled by 1 + 1e-6 inside ``step_bwd``, they move by
about 1e-6 from autodiff's. A fall-back to JAX's derivative would leave them at 1e-15."""

import jax
import jax.numpy as jnp
import pytest

from cells import CELLS, broken_backward, cotangents, make, rel_err, vjp

T, B = 7, 2
OPTIONS = {
    "default": {},
    "lengths-reverse-truncate": dict(lengths=jnp.asarray([T, 3]), reverse=True, truncate=2),
    "states": dict(residuals="states", chunk=3),
    "checkpoint-nested": dict(residuals="checkpoint", chunk=(4, 2)),
    "checkpoint-slots": dict(residuals="checkpoint", chunk=1, slots=2),
}
SEMANTICS = ("lengths", "reverse", "truncate")  # what autodiff's forward needs to match


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("cell", CELLS)
def test_bptt_runs_the_hand_derived_step_backward(monkeypatch, cell, options):
    fn, params, xs, state0 = make(cell, T, B, 3, 4)
    cts = cotangents(fn, params, xs, state0)
    kw = OPTIONS[options]
    _, ref = vjp(fn, (params, xs, state0), cts, backward="autodiff",
                 **{k: v for k, v in kw.items() if k in SEMANTICS})
    _, exact = vjp(fn, (params, xs, state0), cts, **kw)
    assert rel_err(exact, ref) < 1e-12
    scale = lambda d_prev, dz: (d_prev, jax.tree.map(lambda z: z * (1 + 1e-6), dz))  # noqa: E731
    with broken_backward(monkeypatch, cell, scale):
        _, got = vjp(fn, (params, xs, state0), cts, **kw)
    assert 1e-7 < rel_err(got, ref) < 1e-5
