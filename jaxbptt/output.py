"""The output layer y<t> = softmax(Wya a<t> + by) and its cross-entropy, by hand.

With ŷ = softmax(z), z = Wya a + by and L = -Σ m log ŷ[label] (m a per-position
weight, 1 by default), the gradient with respect to the logits is the familiar
``ŷ - y`` (y one-hot)::

    dz   = m (ŷ - y)
    dWya = Σ dz a^T,   dby = Σ dz,   da = Wya^T dz
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxbptt import _checks, _driver


class OutputParams(NamedTuple):
    """Parameters of the softmax output layer."""

    Wya: jax.Array  # (n_y, n_a)
    by: jax.Array  # (n_y,)


def init_output(key, n_a, n_y, dtype=jnp.float32) -> OutputParams:
    """Weights uniform in ±1/sqrt(n_a), zero bias."""
    n_a, n_y = _checks.sizes(n_a=n_a, n_y=n_y)
    dtype = _checks.key_and_dtype(key, dtype)
    k = 1.0 / math.sqrt(n_a)
    return OutputParams(jax.random.uniform(key, (n_y, n_a), dtype, -k, k),
                        jnp.zeros((n_y,), dtype))


def _check(params, hs):
    _checks.params_type(params, OutputParams, "jb.init_output")
    shape_w, dtype_w = _checks.shape_dtype("OutputParams.Wya", params.Wya)
    shape_b, dtype_b = _checks.shape_dtype("OutputParams.by", params.by)
    if len(shape_w) != 2 or shape_b != shape_w[:1]:
        raise ValueError(f"OutputParams must be Wya (n_y, n_a) and by (n_y,), got "
                         f"Wya {shape_w} and by {shape_b}")
    shape_h, dtype_h = _checks.shape_dtype("hs", hs)
    if not shape_h or shape_h[-1] != shape_w[1]:
        raise ValueError(f"hs has shape {shape_h} but Wya {shape_w} expects "
                         f"n_a={shape_w[1]} on the last axis")
    if len({dtype_w, dtype_b, dtype_h}) != 1 or not jnp.issubdtype(dtype_h, jnp.floating):
        raise TypeError(f"OutputParams and hs must share one float dtype, got "
                        f"Wya {dtype_w}, by {dtype_b}, hs {dtype_h}")
    return dtype_h


def logits(params: OutputParams, hs):
    """Wya a + by for every position: hs (..., n_a) -> (..., n_y)."""
    return _driver.affine(hs, params.Wya, params.by)


def predict(params: OutputParams, hs):
    """ŷ = softmax(Wya a + by): hs (..., n_a) -> probabilities (..., n_y)."""
    _check(params, hs)
    return jax.nn.softmax(logits(params, hs), axis=-1)


def _nll(params, hs, labels):
    """-log ŷ[label] at every position (0 where the label is outside [0, n_y)), log ŷ and
    the hs used: zero at those positions, so that not even a NaN there reaches a gradient."""
    n_y = params.Wya.shape[0]
    known = _known(labels, n_y)
    hs = jnp.where(known[..., None], hs, 0)
    logp = jax.nn.log_softmax(logits(params, hs), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.clip(labels, 0, n_y - 1)[..., None], axis=-1)[..., 0]
    return jnp.where(known, -picked, 0), logp, hs


def _known(labels, n_y):
    return (labels >= 0) & (labels < n_y)


def _total(weighted):
    """The sum over positions, in float32 at least: a float16 sum overflows past 65504."""
    return jnp.sum(weighted, dtype=_driver.at_least_float32(weighted.dtype))


@jax.custom_vjp
def _xent(params, hs, labels, weights):
    return _total(weights * _nll(params, hs, labels)[0])


def _xent_fwd(params, hs, labels, weights):
    nll, logp, hs = _nll(params, hs, labels)
    return _total(weights * nll), (params, hs, labels, weights, nll, logp)


def _xent_bwd(saved, g):
    params, hs, labels, weights, nll, logp = saved
    g = g.astype(logp.dtype)  # (the loss may be wider than hs: see _total)
    y = jax.nn.one_hot(labels, logp.shape[-1], dtype=logp.dtype)
    w = jnp.where(_known(labels, logp.shape[-1]), g * weights, 0)  # other labels count for 0
    dz = w[..., None] * (jnp.exp(logp) - y)  # ŷ - y
    lead = tuple(range(dz.ndim - 1))
    grads = OutputParams(Wya=_driver.contract_rows("...y,...a->ya", dz, hs), by=dz.sum(lead))
    return grads, dz @ params.Wya, None, g * nll


_xent.defvjp(_xent_fwd, _xent_bwd)


def cross_entropy(params: OutputParams, hs, labels, weights=None, *, backward="bptt"):
    """Σ_positions weights * -log softmax(Wya a + by)[label], the course's loss.

    Args:
      params: an `OutputParams`.
      hs: hidden states (..., n_a), e.g. (T, B, n_a) from `rnn`/`lstm`/`gru`.
      labels: integer class indices, shape ``hs.shape[:-1]``; a label outside
        [0, n_y) (e.g. -1 for padding) counts for nothing, loss and gradient.
      weights: optional per-position weights (e.g. a padding mask), shape
        ``hs.shape[:-1]``, same dtype as hs; divide by ``weights.sum()`` for a mean.
        A weight of 0 does not hide a NaN or inf in hs (0 · NaN is NaN, and the
        gradient with respect to the weights is the loss there); give such positions
        a label outside [0, n_y), which does.
      backward: ``"bptt"`` for the hand-written gradient ŷ - y, ``"autodiff"``
        for JAX's.

    Returns:
      The summed cross-entropy, a scalar: in hs's dtype, or in float32 for bfloat16 and
      float16 hs (a float16 sum overflows past 65504). The gradients keep hs's dtype.
    """
    dtype = _check(params, hs)
    _checks.backward_mode(backward)
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integer class indices, got {labels.dtype}")
    if labels.shape != hs.shape[:-1]:
        raise ValueError(f"labels must have shape hs.shape[:-1] = {tuple(hs.shape[:-1])}, "
                         f"got {tuple(labels.shape)}")
    if jnp.iinfo(labels.dtype).max < params.Wya.shape[0]:  # n_y would wrap around in it
        labels = labels.astype(jnp.int32)
    if weights is None:
        weights = jnp.ones(hs.shape[:-1], dtype)
    shape, dtype_weights = _checks.shape_dtype("weights", weights)
    if shape != tuple(hs.shape[:-1]):
        raise ValueError(f"weights must have shape hs.shape[:-1] = {tuple(hs.shape[:-1])}, "
                         f"got {shape}")
    if dtype_weights != dtype:
        raise TypeError(f"weights must have hs's dtype {dtype}, got {dtype_weights}")
    if backward == "bptt":  # in shard_map, all cast to vary as the data does: JAX then
        # sums an invariant argument's gradient over the axes (the transpose of the cast)
        params, hs, weights = _driver.varying_like((params, hs, weights),
                                                   (params, hs, labels, weights))
        return _xent(params, hs, labels, weights)
    return _total(weights * _nll(params, hs, labels)[0])
