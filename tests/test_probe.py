"""The probe's gradient is the per-step adjoint dL/d(state<t>), from the reverse scan."""

import jax
import jax.numpy as jnp
import pytest

import jaxbptt as jb
from jaxbptt.gradflow import zeros_probe
from cells import CELLS, cotangents, make, rel_err


def _loss(fn, w, v, **kw):
    def loss(params, xs, state0, probe):
        hs, fin = fn(params, xs, state0, probe=probe, **kw)
        return jnp.sum(jnp.tanh(hs) * w) + sum(
            jnp.sum(a * b) for a, b in zip(jax.tree.leaves(fin), jax.tree.leaves(v)))
    return loss


@pytest.mark.parametrize("cell", CELLS)
def test_probe_gradient_is_the_state_adjoint(cell):
    T = 6
    fn, params, xs, state0 = make(cell, T, 3, 2, 4)
    w, v = cotangents(fn, params, xs, state0)
    probe = zeros_probe(state0, T)
    grads = {b: jax.jit(jax.grad(_loss(fn, w, v, backward=b), argnums=(0, 1, 2, 3)))(
        params, xs, state0, probe) for b in ("bptt", "autodiff")}
    assert rel_err(grads["bptt"], grads["autodiff"]) < 1e-12
    # The probe changes nothing else: the other gradients equal a run without it.
    no_probe = jax.grad(lambda p, x, s: _loss(fn, w, v)(p, x, s, None), argnums=(0, 1, 2))(
        params, xs, state0)
    assert rel_err(grads["bptt"][:3], no_probe) < 1e-12
    # Independent reference: dL/d(state<t>) by restarting the sequence from state<t>, JAX's
    # derivative.
    states = []
    s = state0
    for t in range(T):
        _, s = fn(params, xs[t:t + 1], s)
        states.append(s)
    hs, _ = fn(params, xs, state0)
    for t in (0, 2, T - 1):
        def from_t(s_t):
            hs_rest, fin = (fn(params, xs[t + 1:], s_t, backward="autodiff") if t + 1 < T
                            else (hs[:0], s_t))
            a_t = s_t.a if cell == "lstm" else s_t
            h = jnp.concatenate([hs[:t], a_t[None], hs_rest])
            return jnp.sum(jnp.tanh(h) * w) + sum(
                jnp.sum(a * b) for a, b in zip(jax.tree.leaves(fin), jax.tree.leaves(v)))
        ref = jax.grad(from_t)(states[t])
        got = jax.tree.map(lambda g: g[t], grads["bptt"][3])
        assert rel_err(got, ref) < 1e-12, t


@pytest.mark.parametrize("residuals", ["gates", "states", "checkpoint"])
@pytest.mark.parametrize("cell", CELLS)
def test_probe_values_are_not_used(cell, residuals):
    # A gradient tap: any probe, NaN and inf included, gives what a zero one gives.
    T = 6
    fn, params, xs, state0 = make(cell, T, 3, 2, 4)
    w, v = cotangents(fn, params, xs, state0)
    zeros = zeros_probe(state0, T)
    ones = jax.tree.map(lambda z: z.at[1].set(0.3).at[2].set(jnp.nan).at[3].set(jnp.inf), zeros)
    for backward in ("bptt", "autodiff"):
        loss = jax.jit(jax.value_and_grad(_loss(fn, w, v, backward=backward, residuals=residuals,
                                                chunk=2), argnums=(0, 1, 2, 3)))
        value0, grads0 = loss(params, xs, state0, zeros)
        value, grads = loss(params, xs, state0, ones)
        assert value == value0 and rel_err(grads, grads0) == 0.0, backward


@pytest.mark.parametrize("cell", ["lstm", "gru-cudnn"])
def test_probe_with_lengths_reverse_truncate(cell):
    T = 7
    fn, params, xs, state0 = make(cell, T, 3, 2, 4)
    w, v = cotangents(fn, params, xs, state0)
    probe = zeros_probe(state0, T)
    kw = dict(lengths=jnp.asarray([7, 3, 0]), reverse=True, truncate=2)
    g = {b: jax.jit(jax.grad(_loss(fn, w, v, backward=b, **kw), argnums=3))(
        params, xs, state0, probe) for b in ("bptt", "autodiff")}
    assert rel_err(g["bptt"], g["autodiff"]) < 1e-12
    first = jax.tree.leaves(g["bptt"])[0]
    assert float(jnp.max(jnp.abs(first[3:, 1]))) == 0.0  # padding of row 1 (length 3)
    assert float(jnp.max(jnp.abs(first[:, 2]))) == 0.0  # row 2 has length 0


def test_probe_shape_error():
    fn, params, xs, state0 = make("lstm", 5, 2, 3, 4)
    with pytest.raises(ValueError, match="probe must be shaped like the states over time"):
        fn(params, xs, state0, probe=jb.LSTMState(jnp.zeros((5, 2, 4)), jnp.zeros((4, 2, 4))))
