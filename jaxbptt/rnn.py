"""The tanh RNN cell, its forward and its hand-derived backward.

Forward (course notation, batch-major rows here)::

    a<t> = tanh(Waa a<t-1> + Wax x<t> + ba)

Backward, with da<t> = dL/da<t> (carried from step t+1 plus the output's own)::

    dz<t>    = (1 - a<t>**2) * da<t>          # through tanh
    da<t-1>  = Waa^T dz<t>
    dWaa     = sum_t dz<t> a<t-1>^T,  dWax = sum_t dz<t> x<t>^T,  dba = sum_t dz<t>
    dx<t>    = Wax^T dz<t>
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxbptt import _checks, _driver


class RNNParams(NamedTuple):
    """Parameters of the tanh RNN cell."""

    Wax: jax.Array  # (n_a, n_x)
    Waa: jax.Array  # (n_a, n_a)
    ba: jax.Array  # (n_a,)


_SPEC = {"Wax": ("n_a", "n_x"), "Waa": ("n_a", "n_a"), "ba": ("n_a",)}


def init_rnn(key, n_x, n_a, dtype=jnp.float32) -> RNNParams:
    """Weights uniform in ±1/sqrt(n_a) (PyTorch's default), zero bias."""
    n_x, n_a = _checks.sizes(n_x=n_x, n_a=n_a)
    dtype = _checks.key_and_dtype(key, dtype)
    k = 1.0 / math.sqrt(n_a)
    kx, ka = jax.random.split(key)
    return RNNParams(
        Wax=jax.random.uniform(kx, (n_a, n_x), dtype, -k, k),
        Waa=jax.random.uniform(ka, (n_a, n_a), dtype, -k, k),
        ba=jnp.zeros((n_a,), dtype))


_CHUNK_BYTES = 4 << 20  # one (K, B, n_a) block of a chunk, at most (unless 32 steps exceed it)


class _RNNCell(_driver.HiddenState):
    """The RNN for the driver: carry a<t> (B, n_a), no residuals beyond the states."""

    @staticmethod
    def chunk(B, n_a, dtype):
        """Steps per chunk for "gates" and "states": a chunk keeps no gates, so its
        fixed cost (the outer loops' ops, the products over K B rows) is what short
        chunks pay, and long ones cost memory (a call's temp memory above 32 MiB is
        mapped afresh each time). As many steps as keep a (K, B, n_a) block within
        4 MiB, from 32 to 128 (experiments/RESULTS.md)."""
        block = max(1, B * n_a * jnp.dtype(dtype).itemsize)  # (B = 0: an empty batch runs)
        return int(min(128, max(32, _CHUNK_BYTES // block)))

    @staticmethod
    def fuse(p):
        return p

    @staticmethod
    def unfuse(p, g):
        return g

    @staticmethod
    def project(p, xs):
        return _driver.affine(xs, p.Wax, p.ba)  # (T, B, n_a): Wax x<t> + ba for all t

    @staticmethod
    def step(p, a_prev, zx_t, valid=None):
        return _driver.hold(valid, jnp.tanh(zx_t + a_prev @ p.Waa.T), a_prev), ()

    @staticmethod
    def gates(p, a_prev, zx_t):  # none: tanh' comes from a<t> itself
        return ()

    @staticmethod
    def step_bwd(p, a_prev, a, res, da_next, dh):
        del a_prev, res
        da = da_next + dh  # dL/da<t>: through a<t+1>, and as an output
        dz = (1 - a**2) * da
        return dz @ p.Waa, dz

    @staticmethod
    def chunk_grads(p, xs, a_prevs, res, dz):
        del res
        rows = _driver.chunk_sum  # sums over t and b
        g = RNNParams(Wax=rows("tbi,tbj->ij", dz, xs), Waa=rows("tbi,tbj->ij", dz, a_prevs),
                      ba=rows("tbi->i", dz))
        return g, dz @ p.Wax


RNN_CELL = _RNNCell()


def rnn(params: RNNParams, xs, a0=None, *, backward: str = "bptt", lengths=None,
        reverse: bool = False, truncate=None, time_major: bool = True,
        probe=None, residuals: str | int = "gates", chunk=None,
        slots=None):
    """Runs the tanh RNN over a sequence.

    Args:
      params: an `RNNParams`.
      xs: inputs, (T, B, n_x) (or (B, T, n_x) with ``time_major=False``), of the
        params' float dtype, as the initial state must be (no promotion).
      a0: initial hidden state (B, n_a); ``None`` for zeros.
      backward: ``"bptt"`` for the hand-derived reverse scan (custom_vjp) or
        ``"autodiff"`` for JAX's own derivative of the same forward.
      lengths: optional int (B,): right-padded batch, PyTorch packed-sequence
        semantics (outputs past a length are zero, ``a_T`` is the state at the
        last valid step, padding gets no gradient).
      reverse: run from the last step to the first (within each length).
      truncate: cut the gradient through the state every ``truncate`` steps.
      time_major: ``False`` for batch-major xs and hs.
      probe: optional, shaped like the states over time: (T, B, n_a) (time-major
        whatever ``time_major``), e.g. zeros. A gradient tap: its values are not
        used, and its gradient is dL/d(state<t>) for every t (see `jaxbptt.gradflow`).
      residuals: what the forward keeps for ``backward="bptt"``: ``"gates"``,
        ``"states"``, ``"checkpoint"`` (same gradients, less memory; see the README's
        table) or a budget in bytes (`jaxbptt.residual_plan`).
      chunk: steps per chunk (default: as many as keep K*B*n_a numbers within 4 MiB,
        32 to 128, or a divisor of T near it; sqrt(T) for
        ``"checkpoint"``); with ``"checkpoint"``, a tuple (K1, K2, ...) nests the
        reruns (each size dividing the one before).
      slots: with ``"checkpoint"``, keep at most this many chunk starts at once,
        placed by Gruslys et al.'s dynamic programme (`jaxbptt.slots`).

    Returns:
      ``(hs, a_T)``: all hidden states (T, B, n_a), or (B, T, n_a) with
      ``time_major=False``, and the final one (B, n_a).
    """
    _checks.params_type(params, RNNParams, "jb.init_rnn")
    n_a, n_x, dtype = _checks.params(params, _SPEC)
    return _driver.run(RNN_CELL, params, xs, a0, n_x=n_x, n_a=n_a, dtype=dtype,
                       backward=backward, lengths=lengths, reverse=reverse,
                       truncate=truncate, time_major=time_major, probe=probe,
                       residuals=residuals, chunk=chunk, slots=slots)
