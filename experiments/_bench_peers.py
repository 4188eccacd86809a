"""Peer implementations for bench_bptt.py: textbook scan, remat, Flax linen, Equinox, PyTorch;
and the default layout's matmuls alone (``products_setup``, not a gradient).

Every JAX builder but ``products_setup`` returns ``(fwd, params, state0)`` with
``fwd(params, xs, state0) -> hs`` (hs (T, B, n_a), time-major), so the benchmark
differentiates all of them the same way:
``jax.grad(lambda p, xs, s0, w: sum(fwd(p, xs, s0) * w), argnums=(0, 1, 2))``.
``a0`` and ``c0`` are (B, n_a) arrays shared by every implementation; ``c0`` is None but
for the LSTM. The GRU is the cuDNN / PyTorch / Flax form everywhere.

Flax, Equinox and PyTorch are optional: their builders raise ImportError when the
library is missing (the benchmark skips that peer with a note).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxbptt as jb
from jaxbptt.interop import _cell_to_torch

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

def flax_setup(cell, params, a0, c0):
    """nn.RNN(<Flax cell>(n_a), time_major=True): OptimizedLSTMCell, GRUCell, SimpleCell,
    with jaxbptt's weights ``params`` (so that its gradients can be checked against theirs)."""
    from flax import linen as nn

    make = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell, "rnn": nn.SimpleCell}[cell]
    model = nn.RNN(make(a0.shape[1]), time_major=True)
    carry0 = (c0, a0) if cell == "lstm" else a0  # Flax's LSTM carry is (c, h)
    variables = {"params": {"cell": jb.interop.to_flax(params, model.cell)["params"]}}
    return (lambda v, xs, s0: model.apply(v, xs, initial_carry=s0)), variables, carry0


# --- Equinox ---------------------------------------------------------------------------------

class Unsupported(Exception):
    """The peer has no such cell."""


def equinox_setup(cell, params, n_x, n_a, a0, c0):
    """eqx.nn.LSTMCell / GRUCell, vmapped over the batch and scanned over time, with
    jaxbptt's weights ``params`` (Equinox lays them out as PyTorch does, with one bias per
    gate but the GRU's n gate, whose hidden-side bias is ``bias_n``)."""
    import equinox as eqx

    if cell == "rnn":
        raise Unsupported("equinox has no plain RNN cell")
    make = {"lstm": eqx.nn.LSTMCell, "gru": eqx.nn.GRUCell}[cell]
    module = make(n_x, n_a, key=jax.random.PRNGKey(0))
    mode = {"lstm": "LSTM", "gru": "GRU"}[cell]
    zeros = np.zeros(module.weight_hh.shape[0], np.float32)  # all of the bias on the input side
    w_ih, w_hh, b_ih, b_hh = _cell_to_torch(mode, jax.tree.map(np.asarray, params), n_a, zeros)
    weights = [w_ih, w_hh, b_ih] + ([b_hh[2 * n_a:]] if cell == "gru" else [])
    module = eqx.tree_at(lambda m: [m.weight_ih, m.weight_hh, m.bias]
                         + ([m.bias_n] if cell == "gru" else []), module,
                         [jnp.asarray(x, jnp.float32) for x in weights])
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


# --- the products alone: what XLA needs for the matmuls of jaxbptt's default layout ------

def default_chunk(cell, T, B, n_a):
    """Steps per chunk of jaxbptt's default ("gates") for this cell and shape."""
    from jaxbptt import _driver
    from jaxbptt.gru import GRU_CELLS
    from jaxbptt.lstm import LSTM_CELL
    from jaxbptt.rnn import RNN_CELL

    c = {"lstm": LSTM_CELL, "gru": GRU_CELLS["cudnn"], "rnn": RNN_CELL}[cell]
    K = _driver.default_chunk(c, B, n_a, jnp.float32)
    return _driver.chunk_size(T, _driver.Options(default_chunk=K))


def products_setup(cell, key, T, B, n_x, n_a, a0, w, steps_only=False):
    """The matmuls of jaxbptt's chunked BPTT at its default chunk, with the cell's
    elementwise work cut to a tanh per step forward and a tile-and-multiply backward. Per
    chunk of K steps: the input projection (K B, n_x)·(n_x, G n_a), and in the backward dWh,
    dWx and dx over its K B rows; per step: the recurrent product (B, n_a)·(n_a, G n_a)
    forward and (B, G n_a)·(G n_a, n_a) backward. The forward keeps each step's
    (B, G n_a) product and hidden state for the backward. Not a gradient: its time is what
    XLA takes for the model FLOPs in this layout.
    ``steps_only``: the per-step products alone (two plain scans over T), the part that no
    layout can batch: one after the other, each waiting for the step before.

    Returns ``(fn, args)``: ``fn(*args, xs, a0, w)`` gives arrays shaped as dWh, dWx, dxs,
    da0 (``steps_only``: da0).
    """
    G = {"lstm": 4, "gru": 3, "rnn": 1}[cell]
    K = default_chunk(cell, T, B, n_a)
    if T % K:
        raise Unsupported(f"T = {T} is not a multiple of the default chunk {K}")
    kh, kx = jax.random.split(key)
    bound = 1 / np.sqrt(n_a)
    Wh = jax.random.uniform(kh, (G * n_a, n_a), jnp.float32, -bound, bound)
    Wx = jax.random.uniform(kx, (G * n_a, n_x), jnp.float32, -bound, bound)

    # The steps take Wh as an argument (traced, as the library's fused weights are): closed
    # over, it would be a constant that XLA could lay out for the product at compile time.
    def forward_step(Wh, a, zx_t):
        z = zx_t + a @ Wh.T
        a = jnp.tanh(z[:, :n_a])
        return a, (a, z)

    def backward_step(Wh, da, step_in):
        z_t, w_t = step_in
        dz = jnp.tile(da + w_t, (1, G)) * (0.5 * z_t)
        return dz @ Wh, dz

    def steps(Wh, xs, a0, w):
        del xs
        zx = jnp.zeros((T, B, G * n_a), a0.dtype)
        _, (_, zs) = lax.scan(functools.partial(forward_step, Wh), a0, zx)
        da0, _ = lax.scan(functools.partial(backward_step, Wh), jnp.zeros_like(a0), (zs, w),
                          reverse=True)
        return da0

    def chunked(Wh, Wx, xs, a0, w):
        n = T // K

        def forward_chunk(a, x_k):  # x_k Wx^T: the chunk's (K, B, G n_a) projection
            return lax.scan(functools.partial(forward_step, Wh), a, x_k @ Wx.T)

        xs_k = xs.reshape(n, K, B, n_x)
        _, (hs, zs) = lax.scan(forward_chunk, a0, xs_k)
        starts = jnp.concatenate([a0[None], hs[:-1, -1]])  # the state entering each chunk

        def backward_chunk(carry, chunk_in):
            da, dWh, dWx = carry
            x_k, z_k, start, h_k, w_k = chunk_in
            da, dz = lax.scan(functools.partial(backward_step, Wh), da, (z_k, w_k),
                              reverse=True)
            prevs = jnp.concatenate([start[None], h_k[:-1]])
            dWh = dWh + jnp.einsum("tbg,tbj->gj", dz, prevs)
            dWx = dWx + jnp.einsum("tbg,tbj->gj", dz, x_k)
            return (da, dWh, dWx), dz @ Wx
        zero = (jnp.zeros_like(a0), jnp.zeros_like(Wh), jnp.zeros_like(Wx))
        (da0, dWh, dWx), dxs = lax.scan(backward_chunk, zero,
                                        (xs_k, zs, starts, hs, w.reshape(n, K, B, n_a)),
                                        reverse=True)
        return dWh, dWx, dxs.reshape(T, B, n_x), da0

    return (steps, (Wh,)) if steps_only else (chunked, (Wh, Wx))


# --- PyTorch ---------------------------------------------------------------------------------

def torch_setup(cell, params, xs, a0, c0, w, onednn=True):
    """nn.LSTM / GRU / RNN (tanh), float32 CPU, with jaxbptt's weights ``params``. Returns
    ``run()``: forward + backward once, gradients for the parameters, the inputs and h0 (and
    c0), as the JAX variants; it returns those of the inputs and the initial state.

    On the CPU, PyTorch runs nn.LSTM through oneDNN's fused RNN primitive when oneDNN
    is enabled (its default); ``onednn=False`` runs the call under
    ``torch.backends.mkldnn.flags(enabled=False)``, i.e. PyTorch's own ATen LSTM: a GEMM
    per step and separate elementwise kernels, the path its GRU and RNN always take.
    """
    import contextlib

    import torch

    torch.manual_seed(0)
    n_x, n_a = xs.shape[-1], a0.shape[-1]
    module = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn": torch.nn.RNN}[cell](n_x, n_a)
    jb.interop.to_torch((jax.tree.map(np.asarray, params),), module)
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
        return [leaf.grad for leaf in leaves[-3 if cell == "lstm" else -2:]]

    return run
