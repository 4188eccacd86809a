"""The GRU cell in its two published variants, forwards and hand-derived backwards.

Both variants share the update and reset gates (every W* is (n_a, n_a + n_x) and
acts on [a<t-1>; x<t>]; the hidden half is W*h, the input half W*x)::

    Γu<t> = σ(Wu [a<t-1>; x<t>] + bu)          update gate
    Γr<t> = σ(Wr [a<t-1>; x<t>] + br)          reset gate
    a<t>  = Γu<t> * c̃<t> + (1 - Γu<t>) * a<t-1>   (the course's c<t> = a<t>)

and differ in the candidate c̃<t>:

``variant="course"`` (the course; Cho et al. 2014): reset before the product::

    c̃<t> = tanh(Wch (Γr<t> * a<t-1>) + Wcx x<t> + bc)

``variant="cudnn"`` (cuDNN, PyTorch ``nn.GRU``, Flax ``GRUCell``): reset after
the hidden-side product, which has its own bias ``bch``::

    c̃<t> = tanh(Wcx x<t> + bc + Γr<t> * (Wch a<t-1> + bch))

The variant is read from the params (``bch is None`` for the course's) and may
be stated with ``gru(..., variant=...)``. PyTorch's ``nn.GRU`` keeps
z = 1 - Γu ("keep the old state"); since 1 - σ(v) = σ(-v), its weights map as::

    Wu = -[W_hz, W_iz]   bu = -(b_iz + b_hz)
    Wr =  [W_hr, W_ir]   br =   b_ir + b_hr
    Wc =  [W_hn, W_in]   bc =   b_in,   bch = b_hn

(``weight_ih_l0`` / ``weight_hh_l0`` stack the r, z, n rows in that order.)

Backward, with da = dL/da<t> from step t+1 plus the output's own cotangent::

    dzu = da * (c̃ - a<t-1>) * Γu (1 - Γu)
    dzc = da * Γu * (1 - c̃**2)
  course:
    d(Γr a<t-1>) = Wch^T dzc
    dzr     = d(Γr a<t-1>) * a<t-1> * Γr (1 - Γr)
    da<t-1> = da (1 - Γu) + Γr * d(Γr a<t-1>) + Wuh^T dzu + Wrh^T dzr
    dWch    = sum_t dzc (Γr a<t-1>)^T
  cudnn, with h̃ = Wch a<t-1> + bch:
    dh̃      = dzc * Γr
    dzr     = dzc * h̃ * Γr (1 - Γr)
    da<t-1> = da (1 - Γu) + Wuh^T dzu + Wrh^T dzr + Wch^T dh̃
    dWch    = sum_t dh̃ a<t-1>^T,   dbch = sum_t dh̃
  both: dW*x = sum_t dz* x<t>^T, db* = sum_t dz*, dx<t> = Wux^T dzu + Wrx^T dzr + Wcx^T dzc,
  and dW*h = sum_t dz* a<t-1>^T for the gates.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxbptt import _checks, _driver

VARIANTS = ("course", "cudnn")


class GRUParams(NamedTuple):
    """Parameters of the GRU cell; each W* acts on [a<t-1>; x<t>]."""

    Wu: jax.Array  # (n_a, n_a + n_x)
    bu: jax.Array  # (n_a,)
    Wr: jax.Array  # (n_a, n_a + n_x)
    br: jax.Array  # (n_a,)
    Wc: jax.Array  # (n_a, n_a + n_x)
    bc: jax.Array  # (n_a,)
    bch: Optional[jax.Array] = None  # (n_a,) for "cudnn"; None for "course"


def _spec(variant):
    spec = {f: ("n_a", "n_a+n_x") if f[0] == "W" else ("n_a",) for f in GRUParams._fields}
    if variant == "course":
        del spec["bch"]
    return spec


def init_gru(key, n_x, n_a, dtype=jnp.float32, *, variant="course") -> GRUParams:
    """Weights uniform in ±1/sqrt(n_a) (PyTorch's default), zero biases.

    ``variant="cudnn"`` adds the hidden-side candidate bias ``bch``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    n_x, n_a = _checks.sizes(n_x=n_x, n_a=n_a)
    dtype = _checks.key_and_dtype(key, dtype)
    k = 1.0 / math.sqrt(n_a)
    keys = jax.random.split(key, 3)
    W = [jax.random.uniform(kk, (n_a, n_a + n_x), dtype, -k, k) for kk in keys]
    zeros = jnp.zeros((n_a,), dtype)
    bch = zeros if variant == "cudnn" else None
    return GRUParams(W[0], zeros, W[1], zeros, W[2], zeros, bch)


class _CourseFused(NamedTuple):
    Wurh: jax.Array  # (2 n_a, n_a): [Wuh; Wrh], act on a<t-1>
    Wch: jax.Array  # (n_a, n_a): acts on Γr * a<t-1>
    Wx: jax.Array  # (3 n_a, n_x): [Wux; Wrx; Wcx], act on a chunk's x<t> at once
    b: jax.Array  # (3 n_a,): [bu; br; bc]


class _CudnnFused(NamedTuple):
    Wh: jax.Array  # (3 n_a, n_a): [Wuh; Wrh; Wch], act on a<t-1>
    bh: jax.Array  # (3 n_a,): [0; 0; bch], the hidden-side bias
    Wx: jax.Array  # (3 n_a, n_x)
    b: jax.Array  # (3 n_a,)


def _halves(p):
    n_a = p.bu.shape[0]
    Wh = jnp.concatenate([p.Wu[:, :n_a], p.Wr[:, :n_a], p.Wc[:, :n_a]])
    Wx = jnp.concatenate([p.Wu[:, n_a:], p.Wr[:, n_a:], p.Wc[:, n_a:]])
    return Wh, Wx, jnp.concatenate([p.bu, p.br, p.bc])


def _unfuse(Wh, Wx, b, bch):
    dW = jnp.split(jnp.concatenate([Wh, Wx], axis=1), 3)
    db = jnp.split(b, 3)
    return GRUParams(dW[0], db[0], dW[1], db[1], dW[2], db[2], bch)


class _GRUCell(_driver.Gated, _driver.HiddenState):
    """What both variants share: the input projection and the state update."""

    @staticmethod
    def project(f, xs):
        return _driver.affine(xs, f.Wx, f.b)  # (T, B, 3 n_a): W*x x<t> + b* for all t

    @staticmethod
    def replay(a_prev, res, valid=None):
        gu, _, cc = res[:3]
        return _driver.hold(valid, gu * cc + (1 - gu) * a_prev, a_prev)


class _CourseGRUCell(_GRUCell):
    """Course / Cho et al. GRU: residuals (Γu, Γr, c̃)."""

    @staticmethod
    def fuse(p):
        Wh, Wx, b = _halves(p)
        n_a = p.bu.shape[0]
        return _CourseFused(Wh[: 2 * n_a], Wh[2 * n_a:], Wx, b)

    @staticmethod
    def unfuse(p, g):
        return _unfuse(jnp.concatenate([g.Wurh, g.Wch]), g.Wx, g.b, None)

    @staticmethod
    def gates(f, a_prev, zx_t):
        zxu, zxr, zxc = jnp.split(zx_t, 3, axis=-1)
        zhu, zhr = jnp.split(a_prev @ f.Wurh.T, 2, axis=-1)
        gu, gr = jax.nn.sigmoid(zxu + zhu), jax.nn.sigmoid(zxr + zhr)
        cc = jnp.tanh(zxc + (gr * a_prev) @ f.Wch.T)
        return gu, gr, cc

    @staticmethod
    def step_bwd(f, a_prev, a, res, da_next, dh):
        del a
        gu, gr, cc = res
        da = da_next + dh
        dzu = da * (cc - a_prev) * gu * (1 - gu)
        dzc = da * gu * (1 - cc**2)
        dra = dzc @ f.Wch  # dL/d(Γr * a<t-1>)
        dzr = dra * a_prev * gr * (1 - gr)
        dzur = jnp.concatenate([dzu, dzr], axis=-1)
        da_prev = da * (1 - gu) + gr * dra + dzur @ f.Wurh
        return da_prev, jnp.concatenate([dzur, dzc], axis=-1)

    @staticmethod
    def chunk_grads(f, xs, a_prevs, res, dz):
        _, gr, _ = res
        n_a = a_prevs.shape[-1]
        rows = _driver.chunk_sum  # sums over t and b
        g = _CourseFused(Wurh=rows("tbg,tbj->gj", dz[..., : 2 * n_a], a_prevs),
                         Wch=rows("tbg,tbj->gj", dz[..., 2 * n_a:], gr * a_prevs),
                         Wx=rows("tbg,tbj->gj", dz, xs), b=rows("tbg->g", dz))
        return g, dz @ f.Wx


class _CudnnGRUCell(_GRUCell):
    """cuDNN / PyTorch / Flax GRU: residuals (Γu, Γr, c̃, h̃ = Wch a<t-1> + bch)."""

    @staticmethod
    def fuse(p):
        Wh, Wx, b = _halves(p)
        bh = jnp.concatenate([jnp.zeros_like(p.bu), jnp.zeros_like(p.br), p.bch])
        return _CudnnFused(Wh, bh, Wx, b)

    @staticmethod
    def unfuse(p, g):
        return _unfuse(g.Wh, g.Wx, g.b, jnp.split(g.bh, 3)[2])

    @staticmethod
    def gates(f, a_prev, zx_t):
        zxu, zxr, zxc = jnp.split(zx_t, 3, axis=-1)
        zhu, zhr, hc = jnp.split(_driver.affine(a_prev, f.Wh, f.bh), 3, axis=-1)
        gu, gr = jax.nn.sigmoid(zxu + zhu), jax.nn.sigmoid(zxr + zhr)
        cc = jnp.tanh(zxc + gr * hc)
        return gu, gr, cc, hc

    @staticmethod
    def step_bwd(f, a_prev, a, res, da_next, dh):
        del a
        gu, gr, cc, hc = res
        da = da_next + dh
        dzu = da * (cc - a_prev) * gu * (1 - gu)
        dzc = da * gu * (1 - cc**2)
        dzr = dzc * hc * gr * (1 - gr)
        dhc = dzc * gr
        dzh = jnp.concatenate([dzu, dzr, dhc], axis=-1)  # hidden-side deltas
        return da * (1 - gu) + dzh @ f.Wh, (dzh, dzc)

    @staticmethod
    def chunk_grads(f, xs, a_prevs, res, dz):
        del res
        dzh, dzc = dz
        n_a = a_prevs.shape[-1]
        dz_x = jnp.concatenate([dzh[..., : 2 * n_a], dzc], axis=-1)  # [dzu; dzr; dzc]
        rows = _driver.chunk_sum  # sums over t and b
        g = _CudnnFused(Wh=rows("tbg,tbj->gj", dzh, a_prevs), bh=rows("tbg->g", dzh),
                        Wx=rows("tbg,tbj->gj", dz_x, xs), b=rows("tbg->g", dz_x))
        return g, dz_x @ f.Wx


GRU_CELLS = {"course": _CourseGRUCell(), "cudnn": _CudnnGRUCell()}


def gru_variant(params: GRUParams, variant=None) -> str:
    """The variant ``params`` are for, checked against ``variant`` if given."""
    inferred = "course" if params.bch is None else "cudnn"
    if variant is None:
        return inferred
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant != inferred:
        have = "no bch" if params.bch is None else "a bch"
        raise ValueError(
            f"variant={variant!r} but the GRUParams have {have}: the 'cudnn' variant "
            "needs the hidden-side candidate bias bch, the 'course' variant has none "
            f"(init_gru(..., variant={variant!r}) makes matching params)")
    return variant


def gru(params: GRUParams, xs, a0=None, *, backward: str = "bptt", variant=None,
        lengths=None, reverse: bool = False, truncate=None, time_major: bool = True,
        probe=None, residuals: str | int = "gates", chunk=None,
        slots=None):
    """Runs the GRU over a sequence.

    Args:
      params: a `GRUParams`.
      xs: inputs, (T, B, n_x) (or (B, T, n_x) with ``time_major=False``), of the
        params' float dtype, as the initial state must be (no promotion).
      a0: initial hidden state (B, n_a); ``None`` for zeros.
      backward: ``"bptt"`` for the hand-derived reverse scan (custom_vjp) or
        ``"autodiff"`` for JAX's own derivative of the same forward.
      variant: ``"course"`` or ``"cudnn"`` (see the module docstring); ``None``
        reads it from the params (``params.bch is None`` for ``"course"``).
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
      chunk: steps per chunk (default 8, or a divisor of T near it; sqrt(T) for
        ``"checkpoint"``); with ``"checkpoint"``, a tuple (K1, K2, ...) nests the
        reruns (each size dividing the one before).
      slots: with ``"checkpoint"``, keep at most this many chunk starts at once,
        placed by Gruslys et al.'s dynamic programme (`jaxbptt.slots`).

    Returns:
      ``(hs, a_T)``: all hidden states (T, B, n_a), or (B, T, n_a) with
      ``time_major=False``, and the final one (B, n_a).
    """
    _checks.params_type(params, GRUParams, "jb.init_gru")
    variant = gru_variant(params, variant)
    n_a, n_x, dtype = _checks.params(params, _spec(variant))
    return _driver.run(GRU_CELLS[variant], params, xs, a0, n_x=n_x, n_a=n_a, dtype=dtype,
                       backward=backward, lengths=lengths, reverse=reverse,
                       truncate=truncate, time_major=time_major, probe=probe,
                       residuals=residuals, chunk=chunk, slots=slots)
