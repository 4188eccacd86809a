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
``output(carry) -> a``, ``add_output(dcarry, dh) -> dcarry`` (dh added to the hidden
part), ``zero_state(B, n_a, dtype)``, ``check_state(state, B, n_a, dtype)``.

The forward saves the time-stacked states and ``res``; the backward is a
``lax.scan`` of ``step_bwd`` running against time: BPTT, nothing differentiated
automatically. Three options act on the loop itself, in both directions:

* ``lengths`` (B,): steps t >= lengths[b] leave row b's state unchanged and emit
  zeros; backwards they pass the state's gradient straight through and emit
  dz = 0 (padded inputs are zeroed first, so garbage or inf never reaches a sum).
* ``reverse``: the scan runs from t = T-1 down to 0. With ``lengths`` each row's
  padding is met first and skipped, so every sequence is reversed within its own
  length, as PyTorch's backward direction does.
* ``truncate=k``: the state entering every k-th step of a sequence (counted from
  its first step) is cut from the gradient: ``stop_gradient`` in the forward, a
  zeroed dL/d(state) in the hand-derived backward.

A ``probe`` (time-stacked, shaped like the states, normally zeros) is added to the
state after every step; its gradient is the adjoint dL/d(state<t>) of every step,
which the reverse scan computes anyway: it is emitted at no extra cost.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax

from jaxbptt import _checks


class Options(NamedTuple):
    """Static options of a run (hashable; part of the custom_vjp's static arguments)."""

    reverse: bool = False
    truncate: Optional[int] = None
    probe: bool = False  # whether a probe is passed (its gradient is then emitted)


def affine(x, W, b):
    """x W^T + b over the last axis of x (..., n) -> (..., m), without rank promotion."""
    return x @ W.T + b.reshape((1,) * (x.ndim - 1) + b.shape)


def _where(mask, new, old):
    """Row-wise select over a pytree of (B, ...) arrays: ``new`` where mask (B,) holds."""
    return jax.tree.map(
        lambda n, o: jnp.where(mask.reshape(mask.shape + (1,) * (n.ndim - 1)), n, o), new, old)


def _masks(t, T, B, lengths, opts):
    """``(valid, cut)`` at time index t, each (B,) bool or None when not in use."""
    valid = None if lengths is None else t < lengths
    if not opts.truncate:
        return valid, None
    n = jnp.full((B,), T) if lengths is None else lengths
    taken = n - 1 - t if opts.reverse else jnp.broadcast_to(t, (B,))  # steps before this one
    cut = (taken > 0) & (taken % opts.truncate == 0)
    return valid, cut if valid is None else cut & valid


def _zeros(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def _valid_all(T, lengths):
    return jnp.arange(T)[:, None] < lengths[None, :]  # (T, B)


def _zero_padding(xs, lengths):
    if lengths is None:
        return xs
    return jnp.where(_valid_all(xs.shape[0], lengths)[..., None], xs, 0)


def forward(cell, params, xs, carry0, lengths=None, opts=Options(), probe=None, *,
            keep_residuals=True):
    """Runs ``cell`` over ``xs`` (T, B, n_x) from ``carry0``.

    Returns ``(hs, carry_T, (states, res))``; ``states`` and ``res`` are the
    time-stacked carries and residuals (``None`` when not ``keep_residuals``).
    """
    T, B = xs.shape[:2]
    rec = cell.recurrent(params)
    zx = cell.project(params, _zero_padding(xs, lengths))

    def body(carry, step_in):
        zx_t, t, probe_t = step_in
        valid, cut = _masks(t, T, B, lengths, opts)
        if cut is not None:
            carry = _where(cut, lax.stop_gradient(carry), carry)
        new, res_t = cell.step(rec, carry, zx_t)
        if probe_t is not None:
            new = jax.tree.map(jnp.add, new, probe_t)
        if valid is not None:
            new = _where(valid, new, carry)
        return new, ((new, res_t) if keep_residuals else cell.output(new))

    carry_T, ys = lax.scan(body, carry0, (zx, jnp.arange(T), probe), reverse=opts.reverse)
    saved = ys if keep_residuals else None
    hs = cell.output(ys[0]) if keep_residuals else ys
    if lengths is not None:
        hs = jnp.where(_valid_all(T, lengths)[..., None], hs, 0)
    return hs, carry_T, saved


def backward(cell, params, xs, carry0, states, res, dhs, dcarry_T, lengths=None, opts=Options(),
             with_probe=False):
    """The BPTT reverse scan: cotangents of (hs, carry_T) -> of (params, xs, carry0).

    With ``with_probe`` it also returns dL/d(state<t>) for every t (the probe's gradient).
    """
    T, B = xs.shape[:2]
    rec = cell.recurrent(params)
    # The state each step started from: carry0, then the states of the steps before it.
    shift = ((lambda c0, s: jnp.concatenate([s[1:], c0[None]])) if opts.reverse else
             (lambda c0, s: jnp.concatenate([c0[None], s[:-1]])))
    carry_prevs = jax.tree.map(shift, carry0, states)

    def body(dcarry, step_in):
        carry_prev, carry, res_t, dh_t, t = step_in
        valid, cut = _masks(t, T, B, lengths, opts)
        dprev, dz = cell.step_bwd(rec, carry_prev, carry, res_t, dcarry, dh_t)
        # dL/d(state<t>): what step t+1 sent back, plus the output's own cotangent.
        dstate = cell.add_output(dcarry, dh_t) if with_probe else None
        if valid is not None:  # a padded step is the identity on the state
            dprev = _where(valid, dprev, dcarry)
            dz = _where(valid, dz, _zeros(dz))
            dstate = None if dstate is None else _where(valid, dstate, _zeros(dstate))
        if cut is not None:  # the state entering this step was cut from the gradient
            dprev = _where(cut, _zeros(dprev), dprev)
        return dprev, (dz, dstate)

    dcarry0, (dz, dstates) = lax.scan(
        body, dcarry_T, (carry_prevs, states, res, dhs, jnp.arange(T)), reverse=not opts.reverse)
    dparams, dxs = cell.param_grads(params, _zero_padding(xs, lengths), carry_prevs, res, dz)
    if with_probe:
        return dparams, dxs, dcarry0, dstates
    return dparams, dxs, dcarry0


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _bptt(cell, opts, params, xs, carry0, lengths, probe):
    hs, carry_T, _ = forward(cell, params, xs, carry0, lengths, opts, probe, keep_residuals=False)
    return hs, carry_T


def _bptt_fwd(cell, opts, params, xs, carry0, lengths, probe):
    hs, carry_T, (states, res) = forward(cell, params, xs, carry0, lengths, opts, probe)
    return (hs, carry_T), (params, xs, carry0, lengths, states, res)


def _bptt_bwd(cell, opts, saved, cotangents):
    params, xs, carry0, lengths, states, res = saved
    dhs, dcarry_T = cotangents
    grads = backward(cell, params, xs, carry0, states, res, dhs, dcarry_T, lengths, opts,
                     opts.probe)
    if opts.probe:
        return (*grads[:3], None, grads[3])  # lengths are integers: no cotangent
    return (*grads, None, None)


_bptt.defvjp(_bptt_fwd, _bptt_bwd)


def run(cell, params, xs, state0, *, n_x, n_a, dtype, backward, lengths, reverse, truncate,
        time_major, probe=None):
    """Validates the call and runs ``cell``; returns ``(hs, state_T)``.

    ``backward="bptt"``: the custom_vjp above (hand-derived reverse scan);
    ``backward="autodiff"``: the same forward, differentiated by JAX.
    """
    _checks.backward_mode(backward)
    xs = _checks.time_major(xs, time_major)
    _, B = _checks.sequence(xs, n_x, dtype)
    if state0 is None:
        state0 = cell.zero_state(B, n_a, dtype)
    cell.check_state(state0, B, n_a, dtype)
    lengths = _checks.lengths(lengths, B)
    opts = Options(bool(reverse), _checks.truncate(truncate), probe is not None)
    if probe is not None:
        _checks.probe(probe, state0, xs.shape[0])
    if backward == "bptt":
        hs, state_T = _bptt(cell, opts, params, xs, state0, lengths, probe)
    else:
        hs, state_T, _ = forward(cell, params, xs, state0, lengths, opts, probe,
                                 keep_residuals=False)
    return (hs if time_major else jnp.swapaxes(hs, 0, 1)), state_T
