"""Multi-layer, bidirectional stacks with PyTorch's layout, and streaming TBPTT helpers.

Every layer runs its cell's hand-derived BPTT (``backward="bptt"``) or JAX's
(``"autodiff"``); the stack only wires layers together.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxbptt import _checks, memory
from jaxbptt.gru import GRUParams, gru
from jaxbptt.lstm import LSTMParams, LSTMState, lstm
from jaxbptt.rnn import RNNParams, rnn

_CELLS = {RNNParams: rnn, LSTMParams: lstm, GRUParams: gru}


class Bidirectional(NamedTuple):
    """One bidirectional layer: params of the forward and the backward direction."""

    fwd: Any
    bwd: Any


def _directions(layer):
    return tuple(layer) if isinstance(layer, Bidirectional) else (layer,)


def _describe(layers):
    """(cell fn, params type, D, n_a) shared by every layer, or a clear error."""
    one = type(layers) in _CELLS or isinstance(layers, Bidirectional)  # not in a tuple
    if one or not isinstance(layers, (tuple, list)) or not layers:
        raise TypeError("layers must be a non-empty tuple with one entry per layer, each a "
                        "cell's params or a Bidirectional(fwd, bwd) pair, got "
                        f"{_checks.kind_of(layers)}"
                        + (f" (one layer: pass ({type(layers).__name__}(...),))" if one else ""))
    kinds = {type(p) for layer in layers for p in _directions(layer)}
    if len(kinds) != 1 or next(iter(kinds)) not in _CELLS:
        raise TypeError(f"every layer of a stack must hold params of one cell type "
                        f"(RNNParams, LSTMParams or GRUParams), got "
                        f"{sorted(k.__name__ for k in kinds)}")
    D = {len(_directions(layer)) for layer in layers}
    if len(D) != 1:
        raise ValueError("either every layer of a stack is Bidirectional or none is")
    kind = next(iter(kinds))
    n_as = set()
    for l, layer in enumerate(layers):  # each layer's params whole, before the sizes compare
        for d, p in enumerate(_directions(layer)):
            try:
                n_as.add(_checks.params(p, memory.cell_of(p)[1])[0])
            except (TypeError, ValueError) as e:
                raise type(e)(f"layer {l}{' (backward direction)' if d else ''}: {e}") from e
    if len(n_as) != 1:
        raise ValueError(f"every layer of a stack must have the same hidden size n_a "
                         f"(PyTorch's h_0/h_n layout), got {sorted(n_as)}")
    if kind is GRUParams:
        variants = {p.bch is None for layer in layers for p in _directions(layer)}
        if len(variants) != 1:
            raise ValueError("a GRU stack must use one variant: every layer's bch is None "
                             "('course') or every layer's is an array ('cudnn')")
    return _CELLS[kind], kind, D.pop(), n_as.pop()


def stack(layers, xs, init=None, *, lengths=None, backward: str = "bptt",
          dropout: float = 0.0, key=None, residuals: str | int = "gates", chunk=None,
          slots=None):
    """Runs a stack of recurrent layers, as ``torch.nn.RNN/LSTM/GRU`` with ``num_layers``.

    Args:
      layers: a tuple, one entry per layer: a cell's params (unidirectional) or a
        `Bidirectional` ``(fwd, bwd)`` pair. The cell is read from the params'
        type; all layers share it, the hidden size n_a and the directions D.
      xs: inputs (T, B, n_x).
      init: initial states laid out as PyTorch's ``h_0``: (layers * D, B, n_a),
        index ``layer * D + direction``; an `LSTMState` of two such arrays for
        the LSTM. ``None`` for zeros.
      lengths: optional int (B,), right-padded batch (packed-sequence semantics).
      backward: ``"bptt"`` or ``"autodiff"``, for every layer.
      dropout: probability of zeroing each output of every layer but the last
        (inverted dropout, as PyTorch in training mode); needs ``key``.
      key: PRNG key for the dropout.
      residuals, chunk, slots: what every layer's forward keeps for its
        ``backward="bptt"`` (see `jaxbptt.lstm`); a budget in bytes applies to each
        layer and direction, whose residuals all stay alive until the backward
        reaches them.

    Returns:
      ``(ys, finals)``: ys (T, B, D * n_a), the last layer's outputs with the
      directions concatenated on the last axis (zero past each length), and the
      final states in ``init``'s layout.
    """
    fn, kind, D, n_a = _describe(layers)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float, np.floating)):
        raise TypeError(f"dropout must be a Python float (a static rate, not traced), got "
                        f"{_checks.kind_of(dropout)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if dropout > 0.0 and key is None:
        raise ValueError("dropout > 0 needs a PRNG key: stack(..., dropout=p, key=key)")
    if dropout > 0.0:
        _checks.key(key)
    shape, dtype = _checks.shape_dtype("xs", xs)
    if len(shape) != 3:
        raise ValueError(f"xs must have rank 3 with shape (T, B, n_x), got shape {shape}")
    B = shape[1]
    L = len(layers)
    if init is None:
        zeros = jnp.zeros((L * D, B, n_a), dtype)
        init = LSTMState(zeros, zeros) if kind is LSTMParams else zeros
    if kind is LSTMParams and not isinstance(init, LSTMState):
        raise TypeError(f"init must be an LSTMState of two (layers*D, B, n_a) arrays for "
                        f"an LSTM stack, got {_checks.kind_of(init)}")
    for leaf in init if kind is LSTMParams else (init,):
        if _checks.shape_dtype("init", leaf)[0] != (L * D, B, n_a):
            raise ValueError(f"init has shape {tuple(leaf.shape)}, expected (layers * D, B, "
                             f"n_a) = ({L * D}, {B}, {n_a}) for {L} layers, D={D}")
    keys = jax.random.split(key, L) if dropout > 0.0 else [None] * L
    finals = []
    for l, layer in enumerate(layers):
        if l > 0 and dropout > 0.0:
            keep = jax.random.bernoulli(keys[l], 1.0 - dropout, xs.shape)
            xs = jnp.where(keep, xs / (1.0 - dropout), 0.0).astype(dtype)
        outs = []
        for d, params in enumerate(_directions(layer)):
            state0 = jax.tree.map(lambda s: s[l * D + d], init)
            try:
                hs, state_T = fn(params, xs, state0, lengths=lengths, reverse=d == 1,
                                 backward=backward, residuals=residuals, chunk=chunk,
                                 slots=slots)
            except (TypeError, ValueError) as e:  # say which layer, and what its xs is
                xs_is = (f"the stack's xs {tuple(xs.shape)}" if l == 0 else
                         f"layer {l - 1}'s output {tuple(xs.shape)} = (T, B, D * n_a)")
                raise type(e)(f"layer {l}{' (backward direction)' if d else ''}: {e} "
                              f"[its xs is {xs_is}; its initial state is "
                              f"init[{l * D + d}]]") from e
            outs.append(hs)
            finals.append(state_T)
        xs = jnp.concatenate(outs, axis=-1) if D == 2 else outs[0]
    return xs, jax.tree.map(lambda *s: jnp.stack(s), *finals)


def detach(state):
    """The state with its gradient stopped: carry it into the next chunk of a stream."""
    return jax.tree.map(jax.lax.stop_gradient, state)


def split_stream(stream, chunk: int):
    """Cuts a long time-major stream (T, ...) into (T // chunk, chunk, ...) windows.

    For stateful truncated BPTT over a long sequence (the course's Dinosaurus
    model, min-char-rnn): run each window from the previous window's final
    state, ``detach``-ed, and update the parameters between windows. A
    remainder shorter than ``chunk`` is dropped. Works on a pytree of streams.
    """
    chunk = _checks.positive_int("chunk", chunk)
    leaves = jax.tree.leaves(stream)
    if not leaves:
        raise ValueError("split_stream got no stream (a tree without arrays)")
    for x in leaves:
        shape, _ = _checks.shape_dtype("a stream (T, ...)", x)
        if not shape:
            raise ValueError(f"a stream is time-major (T, ...), got a scalar {x!r}")
    lengths = sorted({x.shape[0] for x in leaves})
    if len(lengths) > 1:
        raise ValueError(f"the streams of a tree must have one length T (axis 0), got {lengths}")

    def cut(x):
        n = x.shape[0] // chunk
        if n == 0:
            raise ValueError(f"a stream of {x.shape[0]} steps has no window of {chunk}")
        return x[: n * chunk].reshape((n, chunk) + x.shape[1:])

    return jax.tree.map(cut, stream)
