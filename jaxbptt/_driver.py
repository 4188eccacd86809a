"""The generic BPTT driver: one ``jax.custom_vjp`` over ``lax.scan`` serving every cell.

A cell is a small static object (see ``rnn.py``, ``lstm.py``, ``gru.py``) supplying

``recurrent(params) -> rec``
    what the recurrence needs at every step (the hidden-side weights, fused).
``project(params, xs) -> zx``
    the input projections ``W_x x<t> + b`` for all t at once: one matmul over T*B.
``step(rec, carry, zx_t) -> (carry_next, res_t)``
    one forward step; ``res_t`` holds what the backward needs beyond the states
    (the gate activations).
``step_bwd(rec, carry_prev, carry, res_t, dcarry, dh_t) -> (dcarry_prev, dz_t)``
    the hand-derived per-step backward. ``dcarry`` is dL/d(state<t>) carried back
    from step t+1, ``dh_t`` the cotangent of the output ``hs[t]``; it returns
    dL/d(state<t-1>) and the pre-activation deltas ``dz_t`` of this step.
``param_grads(params, xs, carry_prevs, res, dz) -> (dparams, dxs)``
    weight, bias and input gradients as single matmuls over T*B, after the loop.
``output(carry) -> a``
    the hidden state emitted as ``hs[t]``.

The forward saves the time-stacked states and ``res``; the backward is a reverse
``lax.scan`` of ``step_bwd``: BPTT, with nothing differentiated automatically.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

BACKWARDS = ("bptt", "autodiff")


def affine(x, W, b):
    """x W^T + b over the last axis of x (..., n) -> (..., m), without rank promotion."""
    return x @ W.T + b.reshape((1,) * (x.ndim - 1) + b.shape)


def forward(cell, params, xs, carry0, *, keep_residuals=True):
    """Runs ``cell`` over ``xs`` (T, B, n_x) from ``carry0``.

    Returns ``(hs, carry_T, (states, res))``; ``states`` and ``res`` are the
    time-stacked carries and residuals (``None`` when not ``keep_residuals``).
    """
    rec = cell.recurrent(params)
    zx = cell.project(params, xs)

    def body(carry, zx_t):
        carry, res_t = cell.step(rec, carry, zx_t)
        if keep_residuals:
            return carry, (carry, res_t)
        return carry, cell.output(carry)

    carry_T, ys = lax.scan(body, carry0, zx)
    if keep_residuals:
        states, res = ys
        return cell.output(states), carry_T, (states, res)
    return ys, carry_T, None


def backward(cell, params, xs, carry0, states, res, dhs, dcarry_T):
    """The BPTT reverse scan: cotangents of (hs, carry_T) -> of (params, xs, carry0)."""
    rec = cell.recurrent(params)
    # state<t-1> for every t: carry0, then the states of steps 0 .. T-2.
    carry_prevs = jax.tree.map(
        lambda c0, s: jnp.concatenate([c0[None], s[:-1]]), carry0, states)

    def body(dcarry, step_in):
        carry_prev, carry, res_t, dh_t = step_in
        return cell.step_bwd(rec, carry_prev, carry, res_t, dcarry, dh_t)

    dcarry0, dz = lax.scan(
        body, dcarry_T, (carry_prevs, states, res, dhs), reverse=True)
    dparams, dxs = cell.param_grads(params, xs, carry_prevs, res, dz)
    return dparams, dxs, dcarry0


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bptt(cell, params, xs, carry0):
    hs, carry_T, _ = forward(cell, params, xs, carry0, keep_residuals=False)
    return hs, carry_T


def _bptt_fwd(cell, params, xs, carry0):
    hs, carry_T, (states, res) = forward(cell, params, xs, carry0)
    return (hs, carry_T), (params, xs, carry0, states, res)


def _bptt_bwd(cell, saved, cotangents):
    dhs, dcarry_T = cotangents
    return backward(cell, *saved, dhs, dcarry_T)


_bptt.defvjp(_bptt_fwd, _bptt_bwd)


def run(cell, params, xs, carry0, backward):
    """``(hs, carry_T)`` of ``cell`` over ``xs``, differentiated as ``backward`` says.

    ``backward="bptt"``: the custom_vjp above (hand-derived reverse scan);
    ``backward="autodiff"``: the same forward, differentiated by JAX.
    """
    if backward == "bptt":
        return _bptt(cell, params, xs, carry0)
    if backward == "autodiff":
        hs, carry_T, _ = forward(cell, params, xs, carry0, keep_residuals=False)
        return hs, carry_T
    raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
