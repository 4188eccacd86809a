"""The LSTM cell, its forward and its hand-derived backward (course notation).

Forward, with [a<t-1>; x<t>] the concatenation and every W* of shape
(n_a, n_a + n_x)::

    Γf<t> = σ(Wf [a<t-1>; x<t>] + bf)          forget gate
    Γi<t> = σ(Wi [a<t-1>; x<t>] + bi)          input (update) gate, the course's Γu
    c̃<t>  = tanh(Wc [a<t-1>; x<t>] + bc)       candidate
    Γo<t> = σ(Wo [a<t-1>; x<t>] + bo)          output gate
    c<t>  = Γf<t> * c<t-1> + Γi<t> * c̃<t>
    a<t>  = Γo<t> * tanh(c<t>)

Backward (the course's LSTM backward pass), with da<t> = dL/da<t> from step t+1
plus the output's own cotangent, dc<t> the part of dL/dc<t> carried back from
step t+1, and dc the whole of it::

    dc      = dc<t> + da<t> * Γo * (1 - tanh(c<t>)**2)   # all paths into c<t>
    dzo     = da<t> * tanh(c<t>) * Γo * (1 - Γo)
    dzc     = dc * Γi * (1 - c̃**2)
    dzi     = dc * c̃ * Γi * (1 - Γi)
    dzf     = dc * c<t-1> * Γf * (1 - Γf)
    dc<t-1> = dc * Γf
    [da<t-1>; dx<t>] = Wf^T dzf + Wi^T dzi + Wc^T dzc + Wo^T dzo
    dW*     = sum_t dz* [a<t-1>; x<t>]^T,   db* = sum_t dz*

Inside the loop only the hidden half of the W's is used, fused as one
(4 n_a, n_a) matrix; the input half acts on a chunk's x<t> in one matmul before
its steps. So `_LSTMCell.step_bwd` below is one step's equations up to da<t-1>,
and `_LSTMCell.chunk_grads` gives dx and the dW*, db* of a chunk's steps as single
matmuls after them; the loops over steps and chunks are `_driver`'s.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxbptt import _checks, _driver


class LSTMParams(NamedTuple):
    """Parameters of the LSTM cell; each W* acts on [a<t-1>; x<t>]."""

    Wf: jax.Array  # (n_a, n_a + n_x)
    bf: jax.Array  # (n_a,)
    Wi: jax.Array  # (n_a, n_a + n_x)
    bi: jax.Array  # (n_a,)
    Wc: jax.Array  # (n_a, n_a + n_x)
    bc: jax.Array  # (n_a,)
    Wo: jax.Array  # (n_a, n_a + n_x)
    bo: jax.Array  # (n_a,)


class LSTMState(NamedTuple):
    """The LSTM's state: hidden a<t> first, memory cell c<t> second (as PyTorch's (h, c))."""

    a: jax.Array  # (B, n_a)
    c: jax.Array  # (B, n_a)


_SPEC = {f: ("n_a", "n_a+n_x") if f[0] == "W" else ("n_a",) for f in LSTMParams._fields}


def init_lstm(key, n_x, n_a, dtype=jnp.float32, *, forget_bias=1.0) -> LSTMParams:
    """Weights uniform in ±1/sqrt(n_a) (PyTorch's default); biases zero but bf.

    ``bf = forget_bias`` (1.0 by default, Jozefowicz et al. 2015) keeps the
    memory open at initialisation.
    """
    n_x, n_a = _checks.sizes(n_x=n_x, n_a=n_a)
    dtype = _checks.key_and_dtype(key, dtype)
    _checks.finite("forget_bias", forget_bias, n_a)
    k = 1.0 / math.sqrt(n_a)
    keys = jax.random.split(key, 4)
    W = [jax.random.uniform(kk, (n_a, n_a + n_x), dtype, -k, k) for kk in keys]
    zeros = jnp.zeros((n_a,), dtype)
    bf = zeros + jnp.asarray(forget_bias, dtype)  # in dtype, whatever forget_bias's own
    return LSTMParams(W[0], bf, W[1], zeros, W[2], zeros, W[3], zeros)


class _Fused(NamedTuple):
    """The four gates stacked [f; i; c; o], split into hidden and input halves."""

    Wh: jax.Array  # (4 n_a, n_a), acts on a<t-1> inside the loop
    Wx: jax.Array  # (4 n_a, n_x), acts on a chunk's x<t> at once
    b: jax.Array  # (4 n_a,)


class _Gates(NamedTuple):
    """One step's (or a block of steps') gate activations, each (..., B, n_a)."""

    f: jax.Array
    i: jax.Array
    c: jax.Array  # c̃
    o: jax.Array


def _gate_scale(z):
    """k per gate column, shaped to broadcast against z (..., 4 n_a): 1/2 for the
    sigmoid gates f, i, o and 1 for the tanh candidate, so that k tanh(k z) + 1 - k
    is σ on the gates and tanh on c̃: all four in one elementwise pass."""
    n_a = z.shape[-1] // 4
    k = jnp.repeat(jnp.array([0.5, 0.5, 1.0, 0.5], z.dtype), n_a)
    return k.reshape((1,) * (z.ndim - 1) + k.shape)


class _LSTMCell(_driver.Gated):
    """The LSTM for the driver: carry LSTMState, residuals `_Gates` (Γf, Γi, c̃, Γo), each
    (B, n_a)."""

    @staticmethod
    def fuse(p):
        n_a = p.bf.shape[0]
        W = jnp.concatenate([p.Wf, p.Wi, p.Wc, p.Wo])
        return _Fused(W[:, :n_a], W[:, n_a:], jnp.concatenate([p.bf, p.bi, p.bc, p.bo]))

    @staticmethod
    def unfuse(p, g):
        dW = jnp.split(jnp.concatenate([g.Wh, g.Wx], axis=1), 4)
        db = jnp.split(g.b, 4)
        return LSTMParams(dW[0], db[0], dW[1], db[1], dW[2], db[2], dW[3], db[3])

    @staticmethod
    def project(f, xs):
        return _driver.affine(xs, f.Wx, f.b)  # (T, B, 4 n_a): W*x x<t> + b* for all t

    @staticmethod
    def gates(f, a_prev, zx_t):
        z = zx_t + a_prev @ f.Wh.T
        k = _gate_scale(z)
        G = k * jnp.tanh(k * z) + (1 - k)  # [Γf, Γi, c̃, Γo]: σ(z) = tanh(z/2)/2 + 1/2
        # Kept as four arrays: on XLA's CPU backend, a fusion that reads several column
        # slices of a step of one scanned array runs 2-5x slower than one that reads
        # whole arrays (experiments/cpu_limits.py), and each gate delta reads three gates.
        return _Gates(*jnp.split(G, 4, axis=-1))

    @staticmethod
    def replay(prev, G, valid=None):
        gf, gi, cc, go = G
        # A padded row (valid False) keeps c<t-1>, and a<t> is computed from the held c:
        # then nothing reads c<t-1> after c<t> is written over it, and XLA need not copy it.
        c = _driver.hold(valid, gf * prev.c + gi * cc, prev.c)
        a = _driver.hold(valid, go * jnp.tanh(c), prev.a)
        return LSTMState(a, c)

    @staticmethod
    def step_bwd(f, prev, s, G, ds_next, dh):
        gf, gi, cc, go = G
        da = ds_next.a + dh  # dL/da<t>: through step t+1, and as an output
        tc = jnp.tanh(s.c)
        dc = ds_next.c + da * go * (1 - tc**2)
        # dL/d[Γf, Γi, c̃, Γo], then through σ' = Γ (1 - Γ) and tanh' = 1 - c̃**2:
        dzf = dc * prev.c * gf * (1 - gf)
        dzi = dc * cc * gi * (1 - gi)
        dzc = dc * gi * (1 - cc**2)
        dzo = da * tc * go * (1 - go)
        dz = jnp.concatenate([dzf, dzi, dzc, dzo], axis=-1)  # (B, 4 n_a)
        return LSTMState(a=dz @ f.Wh, c=dc * gf), dz

    @staticmethod
    def chunk_grads(f, xs, prevs, gates, dz):
        del gates
        rows = _driver.chunk_sum  # sums over t and b: sum_t dz [a<t-1>; x<t>]^T, sum_t dz
        g = _Fused(Wh=rows("tbg,tbj->gj", dz, prevs.a), Wx=rows("tbg,tbj->gj", dz, xs),
                   b=rows("tbg->g", dz))
        return g, dz @ f.Wx

    @staticmethod
    def output(s):
        return s.a

    @staticmethod
    def add_output(ds, dh):
        return ds._replace(a=ds.a + dh)

    @staticmethod
    def zero_state(B, n_a, dtype):
        return LSTMState(jnp.zeros((B, n_a), dtype), jnp.zeros((B, n_a), dtype))

    @staticmethod
    def check_state(state0, B, n_a, dtype):
        if not isinstance(state0, LSTMState):
            raise TypeError(f"state0 must be an LSTMState(a, c) or None, got "
                            f"{_checks.kind_of(state0)}")
        _checks.state("state0.a", state0.a, B, n_a, dtype)
        _checks.state("state0.c", state0.c, B, n_a, dtype)


LSTM_CELL = _LSTMCell()


def lstm(params: LSTMParams, xs, state0=None, *, backward: str = "bptt", lengths=None,
         reverse: bool = False, truncate=None, time_major: bool = True,
         probe=None, residuals: str | int = "gates", chunk=None,
         slots=None):
    """Runs the LSTM over a sequence.

    Args:
      params: an `LSTMParams`.
      xs: inputs, (T, B, n_x) (or (B, T, n_x) with ``time_major=False``), of the
        params' float dtype, as the initial state must be (no promotion).
      state0: initial `LSTMState` (a0, c0), each (B, n_a); ``None`` for zeros.
      backward: ``"bptt"`` for the hand-derived reverse scan (custom_vjp) or
        ``"autodiff"`` for JAX's own derivative of the same forward.
      lengths: optional int (B,): right-padded batch, PyTorch packed-sequence
        semantics (outputs past a length are zero, the final state is the state
        at the last valid step, padding gets no gradient).
      reverse: run from the last step to the first (within each length).
      truncate: cut the gradient through the state every ``truncate`` steps.
      time_major: ``False`` for batch-major xs and hs.
      probe: optional, shaped like the states over time: an `LSTMState` of two
        (T, B, n_a) arrays (time-major whatever ``time_major``), e.g. zeros. A gradient
        tap: its values are not used, and its gradient is dL/d(state<t>) for every t
        (see `jaxbptt.gradflow`).
      residuals: what the forward keeps for ``backward="bptt"``: ``"gates"``,
        ``"states"``, ``"checkpoint"`` (same gradients, less memory; see the README's
        table) or a budget in bytes (`jaxbptt.residual_plan`).
      chunk: steps per chunk (default 8, or a divisor of T near it; sqrt(T) for
        ``"checkpoint"``); with ``"checkpoint"``, a tuple (K1, K2, ...) nests the
        reruns (each size dividing the one before).
      slots: with ``"checkpoint"``, keep at most this many chunk starts at once,
        placed by Gruslys et al.'s dynamic programme (`jaxbptt.slots`).

    Returns:
      ``(hs, state_T)``: all hidden states a<t> (T, B, n_a), or (B, T, n_a) with
      ``time_major=False``, and the final `LSTMState`. Gradients flow to params,
      xs, a0 and c0.
    """
    _checks.params_type(params, LSTMParams, "jb.init_lstm")
    n_a, n_x, dtype = _checks.params(params, _SPEC)
    return _driver.run(LSTM_CELL, params, xs, state0, n_x=n_x, n_a=n_a, dtype=dtype,
                       backward=backward, lengths=lengths, reverse=reverse,
                       truncate=truncate, time_major=time_major, probe=probe,
                       residuals=residuals, chunk=chunk, slots=slots)
