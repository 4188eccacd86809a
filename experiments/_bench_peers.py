"""Peer implementations for bench_bptt.py: textbook scan, remat, Flax linen, Equinox, PyTorch.

Every JAX builder returns ``(fwd, params, state0)`` with ``fwd(params, xs, state0) -> hs``
(hs (T, B, n_a), time-major), so the benchmark differentiates all of them the same way:
``jax.grad(lambda p, xs, s0, w: sum(fwd(p, xs, s0) * w), argnums=(0, 1, 2))``.
``a0`` and ``c0`` are (B, n_a) arrays shared by every implementation; ``c0`` is None but
for the LSTM. The GRU is the cuDNN / PyTorch / Flax form everywhere.

Flax, Equinox and PyTorch are optional: their builders raise ImportError when the
library is missing (the benchmark skips that peer with a note).
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxbptt as jb

CELLS = ("lstm", "gru", "rnn")


# --- autodiff with jax.checkpoint on the scan body (same math as jaxbptt's cells) -------------

def _remat_lstm(p, xs, s0):
    n_a = p.bf.shape[0]
    W = jnp.concatenate([p.Wf, p.Wi, p.Wc, p.Wo])  # (4 n_a, n_a + n_x), acts on [a; x]
    b = jnp.concatenate([p.bf, p.bi, p.bc, p.bo])
    Wh, Wx = W[:, :n_a], W[:, n_a:]
    zx = xs @ Wx.T + b  # input projection for all t, before the loop (as jaxbptt)

    @jax.checkpoint
    def step(Wh, carry, zx_t):
        a, c = carry
        zf, zi, zc, zo = jnp.split(zx_t + a @ Wh.T, 4, axis=-1)
        c = jax.nn.sigmoid(zf) * c + jax.nn.sigmoid(zi) * jnp.tanh(zc)
        return jax.nn.sigmoid(zo) * jnp.tanh(c), c

    def body(carry, zx_t):
        carry = step(Wh, carry, zx_t)
        return carry, carry[0]

    return lax.scan(body, (s0.a, s0.c), zx)[1]


def _remat_gru(p, xs, a0):  # cuDNN form: c~ = tanh(Wcx x + bc + r * (Wch a + bch))
    n_a = p.bu.shape[0]
    Wh = jnp.concatenate([p.Wu[:, :n_a], p.Wr[:, :n_a], p.Wc[:, :n_a]])  # (3 n_a, n_a)
    Wx = jnp.concatenate([p.Wu[:, n_a:], p.Wr[:, n_a:], p.Wc[:, n_a:]])  # (3 n_a, n_x)
    zx = xs @ Wx.T + jnp.concatenate([p.bu, p.br, p.bc])

    @jax.checkpoint
    def step(Wh, bch, a, zx_t):
        zxu, zxr, zxc = jnp.split(zx_t, 3, axis=-1)
        zhu, zhr, hc = jnp.split(a @ Wh.T, 3, axis=-1)
        gu, gr = jax.nn.sigmoid(zxu + zhu), jax.nn.sigmoid(zxr + zhr)
        cc = jnp.tanh(zxc + gr * (hc + bch))
        return gu * cc + (1 - gu) * a

    def body(a, zx_t):
        a = step(Wh, p.bch, a, zx_t)
        return a, a

    return lax.scan(body, a0, zx)[1]


def _remat_rnn(p, xs, a0):
    zx = xs @ p.Wax.T + p.ba

    @jax.checkpoint
    def step(Waa, a, zx_t):
        return jnp.tanh(zx_t + a @ Waa.T)

    def body(a, zx_t):
        a = step(p.Waa, a, zx_t)
        return a, a

    return lax.scan(body, a0, zx)[1]


# --- the textbook scan: each step's gates from [a<t-1>; x<t>] in the loop, plain autodiff -----

def _scan_lstm(p, xs, s0):
    W = jnp.concatenate([p.Wf, p.Wi, p.Wc, p.Wo])  # (4 n_a, n_a + n_x), acts on [a; x]
    b = jnp.concatenate([p.bf, p.bi, p.bc, p.bo])

    def body(carry, x_t):
        a, c = carry
        zf, zi, zc, zo = jnp.split(jnp.concatenate([a, x_t], -1) @ W.T + b, 4, axis=-1)
        c = jax.nn.sigmoid(zf) * c + jax.nn.sigmoid(zi) * jnp.tanh(zc)
        a = jax.nn.sigmoid(zo) * jnp.tanh(c)
        return (a, c), a

    return lax.scan(body, (s0.a, s0.c), xs)[1]


def _scan_gru(p, xs, a0):  # cuDNN form
    n_a = p.bu.shape[0]
    Wur = jnp.concatenate([p.Wu, p.Wr])  # (2 n_a, n_a + n_x)
    bur = jnp.concatenate([p.bu, p.br])

    def body(a, x_t):
        gu, gr = jnp.split(jax.nn.sigmoid(jnp.concatenate([a, x_t], -1) @ Wur.T + bur), 2, -1)
        cc = jnp.tanh(x_t @ p.Wc[:, n_a:].T + p.bc + gr * (a @ p.Wc[:, :n_a].T + p.bch))
        a = gu * cc + (1 - gu) * a
        return a, a

    return lax.scan(body, a0, xs)[1]


def _scan_rnn(p, xs, a0):
    def body(a, x_t):
        a = jnp.tanh(x_t @ p.Wax.T + a @ p.Waa.T + p.ba)
        return a, a

    return lax.scan(body, a0, xs)[1]


def jaxbptt_params(cell, key, n_x, n_a):
    if cell == "lstm":
        return jb.init_lstm(key, n_x, n_a)
    if cell == "gru":
        return jb.init_gru(key, n_x, n_a, variant="cudnn")
    return jb.init_rnn(key, n_x, n_a)


def jaxbptt_state(cell, a0, c0):
    return jb.LSTMState(a0, c0) if cell == "lstm" else a0


def jaxbptt_fwd(cell, backward, residuals=None, **options):
    """jb.<cell>(..., backward=backward[, residuals=residuals], **options) -> hs."""
    kw = {"backward": backward, **options}
    if residuals is not None:
        kw["residuals"] = residuals
    if cell == "lstm":
        return lambda p, xs, s0: jb.lstm(p, xs, s0, **kw)[0]
    if cell == "gru":
        return lambda p, xs, s0: jb.gru(p, xs, s0, variant="cudnn", **kw)[0]
    return lambda p, xs, s0: jb.rnn(p, xs, s0, **kw)[0]


def scan_setup(cell, key, n_x, n_a, a0, c0):
    fwd = {"lstm": _scan_lstm, "gru": _scan_gru, "rnn": _scan_rnn}[cell]
    return fwd, jaxbptt_params(cell, key, n_x, n_a), jaxbptt_state(cell, a0, c0)


def remat_setup(cell, key, n_x, n_a, a0, c0):
    fwd = {"lstm": _remat_lstm, "gru": _remat_gru, "rnn": _remat_rnn}[cell]
    return fwd, jaxbptt_params(cell, key, n_x, n_a), jaxbptt_state(cell, a0, c0)


# --- Flax linen ------------------------------------------------------------------------------

def flax_setup(cell, key, n_x, n_a, a0, c0):
    """nn.RNN(<Flax cell>(n_a), time_major=True): OptimizedLSTMCell, GRUCell, SimpleCell."""
    from flax import linen as nn

    make = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell, "rnn": nn.SimpleCell}[cell]
    model = nn.RNN(make(n_a), time_major=True)
    carry0 = (c0, a0) if cell == "lstm" else a0  # Flax's LSTM carry is (c, h)
    variables = model.init(key, jnp.zeros((2, a0.shape[0], n_x), jnp.float32),
                           initial_carry=carry0)
    return (lambda v, xs, s0: model.apply(v, xs, initial_carry=s0)), variables, carry0


# --- Equinox ---------------------------------------------------------------------------------

class Unsupported(Exception):
    """The peer has no such cell."""


def equinox_setup(cell, key, n_x, n_a, a0, c0):
    """eqx.nn.LSTMCell / GRUCell, vmapped over the batch and scanned over time."""
    import equinox as eqx

    if cell == "lstm":
        module = eqx.nn.LSTMCell(n_x, n_a, key=key)
    elif cell == "gru":
        module = eqx.nn.GRUCell(n_x, n_a, key=key)
    else:
        raise Unsupported("equinox has no plain RNN cell")
    params, static = eqx.partition(module, eqx.is_array)

    def fwd(params, xs, s0):
        m = eqx.combine(params, static)
        if cell == "lstm":
            step = jax.vmap(lambda x, h, c: m(x, (h, c)))

            def body(carry, x_t):
                carry = step(x_t, *carry)
                return carry, carry[0]
        else:
            step = jax.vmap(m)

            def body(h, x_t):
                h = step(x_t, h)
                return h, h
        return lax.scan(body, s0, xs)[1]

    return fwd, params, ((a0, c0) if cell == "lstm" else a0)


# --- PyTorch ---------------------------------------------------------------------------------

def torch_setup(cell, n_x, n_a, xs, a0, c0, w, onednn=True):
    """nn.LSTM / GRU / RNN (tanh), float32 CPU. Returns ``run()``: forward + backward once,
    gradients for the parameters, the inputs and h0 (and c0), as the JAX variants.

    On the CPU, PyTorch runs nn.LSTM through oneDNN's fused RNN primitive when oneDNN
    is enabled (its default); ``onednn=False`` runs the call under
    ``torch.backends.mkldnn.flags(enabled=False)``, i.e. PyTorch's own ATen LSTM: a GEMM
    per step and separate elementwise kernels, the path its GRU and RNN always take.
    """
    import contextlib

    import torch

    torch.manual_seed(0)
    module = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell](n_x, n_a)
    t = lambda x: torch.tensor(np.array(x, dtype=np.float32))  # noqa: E731
    xs_t = t(xs).requires_grad_()
    h0 = t(a0)[None].requires_grad_()
    c0_t = t(c0)[None].requires_grad_() if cell == "lstm" else None
    w_t = t(w)
    leaves = [*module.parameters(), xs_t, h0] + ([c0_t] if c0_t is not None else [])

    def run():
        for leaf in leaves:
            leaf.grad = None
        with contextlib.nullcontext() if onednn else torch.backends.mkldnn.flags(enabled=False):
            hs, _ = module(xs_t, (h0, c0_t) if cell == "lstm" else h0)
            (hs * w_t).sum().backward()
        return leaves[0].grad

    return run
