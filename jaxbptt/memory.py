"""Residuals for a memory budget: ``residuals=<bytes>`` and `residual_plan`.

Give any sequence function ``residuals=`` a number of bytes instead of a policy
name and it runs the plan (policy, chunk size, slots) of least estimated time whose
estimated bytes fit (`plan`, `plan_bytes`). `residual_plan` says what a call
would run.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxbptt import _checks, _driver
from jaxbptt import slots as _slots


class Plan(NamedTuple):
    """A residual policy, its chunk size, the bytes it is estimated to keep and, for
    ``"checkpoint"``, the most chunk starts kept at once (``None``: all)."""

    residuals: str
    chunk: int
    bytes: int
    slots: int | None = None


class Footprint(NamedTuple):
    """Bytes per step of the state, the residuals, the pre-activations, the input and
    the output, the bytes of the (fused) weights, and what each policy keeps."""

    s: int
    r: int
    z: int
    x: int
    y: int
    w: int
    keeps: dict  # policy -> the `Saved` fields it keeps for this cell


def footprint(cell, params, B, n_x, n_a, dtype):
    """The `Footprint` of ``cell`` at batch B."""
    f = jax.eval_shape(cell.fuse, params)
    carry = jax.eval_shape(lambda: cell.zero_state(B, n_a, dtype))
    zx = jax.eval_shape(cell.project, f, jax.ShapeDtypeStruct((1, B, n_x), dtype))
    zx_t = jax.tree.map(lambda z: jax.ShapeDtypeStruct(z.shape[1:], z.dtype), zx)
    res = jax.eval_shape(lambda f, c, z: cell.step(f, c, z)[1], f, carry, zx_t)
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    return Footprint(nbytes(carry), nbytes(res), nbytes(zx_t), B * n_x * jnp.dtype(dtype).itemsize,
                     nbytes(jax.eval_shape(cell.output, carry)), nbytes(f),
                     {p: _driver._keeps(cell, p) for p in _driver.POLICIES})


def plan_bytes(policy, K, T, fp, slots=None):
    """What ``policy`` keeps through the backward, plus its transients, in bytes.

    Kept, per step: the states s, outputs y or residuals r the policy keeps for this
    cell (`_driver._keeps`), and the state s entering each of the ceil(T/K) chunks
    (kept by the forward, or picked from the kept states by the backward, into a
    buffer of their own).
    Transient: a chunk's pre-activations, deltas and their transpose (3 z), input
    gradients (x), the previous states (s), and what the backward rebuilds: the
    residuals (r) and the states (s), unless kept, and the previous outputs (y)
    they are recomputed from; the fused weights and their gradient accumulator
    (2 w). (When K does not divide T, the steps left run as one shorter chunk, in
    place: nothing more is kept.) Nested checkpointing, K = (K1, K2, ...): the ceil(T/K1)
    states kept, the states entering the sub-chunks of one chunk at every level,
    the inputs, output cotangents and input gradients (2 x + y per step) of one
    chunk at every level but the innermost, and the innermost chunk's transients
    as above. With ``slots`` = m < ceil(T/K): m + 1 chunk starts (a scratch slot),
    and the reruns' input projections (K z), which XLA keeps apart.
    XLA's temp memory was 0.82-1.03x this for the LSTM, 0.85-1.08x for the GRU and
    0.68-1.14x for the RNN, at T from 50 to 1021 (experiments/memory_estimate.py); for
    one-step chunks with one to four slots, 0.91-0.99x, 0.80-0.82x and 0.54-0.61x.
    """
    sizes = K if isinstance(K, tuple) else (K,)
    n = -(-T // sizes[0])
    keep = fp.keeps[policy]
    per_step = {"states": fp.s, "outputs": fp.y, "res": fp.r}
    reruns = slots is not None and slots < n  # (slots >= n keeps every start: plain)
    starts = slots + 1 if reruns else n
    kept = (sum(T * per_step[k] for k in keep if k in per_step)  # the chunk starts: kept,
            + starts * fp.s * ("starts" in keep or "states" in keep))  # or picked from states
    rebuilt = (fp.s + (fp.r if "res" not in keep else 0) + (fp.s if "states" not in keep else 0)
               + (fp.y if "outputs" in keep else 0))
    nested = sum(outer // inner * fp.s for outer, inner in zip(sizes, sizes[1:]))
    nested += sum(sizes[:-1]) * (2 * fp.x + fp.y)
    rerun = sizes[0] * fp.z if reruns else 0  # the reruns' projections, apart
    return kept + nested + sizes[-1] * (3 * fp.z + fp.x + rebuilt) + 2 * fp.w + rerun


# Time of each policy relative to "gates" at the same chunk (experiments/RESULTS.md), and
# the cost of short chunks: each chunk adds a fixed overhead of about one step, so n chunks
# cost (1 + n/T), 1 + 1/K when K divides T. (A K that does not, with as many chunks as a
# divisor's, costs more: it keeps more, and its shorter last chunk is a second trace.)
_RELATIVE_TIME = {"gates": 1.0, "states": 1.2, "checkpoint": 1.3}
_MAX_SLOT_CHUNK = 64  # the longest chunk the planner pairs with slots


def _time(p, T):
    base = _RELATIVE_TIME[p.residuals]
    n = -(-T // p.chunk)
    if p.slots is not None:  # each chunk forward rerun costs what "checkpoint" adds per chunk
        base += (_RELATIVE_TIME["checkpoint"] - 1) * _slots.cost(n, p.slots) / n
    return base * (1 + n / T)


def _slot_plans(T, fp, budget):
    """For every chunk K up to `_MAX_SLOT_CHUNK`: "checkpoint" keeping as many chunk
    starts as ``budget`` leaves room for, when that is fewer than all of them."""
    plans = []
    for K in range(1, min(T, _MAX_SLOT_CHUNK) + 1):
        n = -(-T // K)
        m = (budget - plan_bytes("checkpoint", K, T, fp, slots=0)) // max(fp.s, 1)
        if 1 <= m < n:
            plans.append(Plan("checkpoint", K, plan_bytes("checkpoint", K, T, fp, m), m))
    return plans


def check_budget(budget):
    """A memory budget as an int of bytes, or a ValueError (a TypeError if traced)."""
    _checks.static("residuals", budget, "int")
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget <= 0:
        raise ValueError(f"a memory budget must be a positive int of bytes, got {budget!r}")
    return int(budget)


def plan(T, fp, budget, default_chunk=_driver.CHUNK):
    """The residual plan of least estimated time whose `plan_bytes` fit ``budget``.

    The candidates are every policy at every chunk K (up to its default for
    "gates" and "states", whose transients only grow with K); the estimated time
    is ``_RELATIVE_TIME[policy] * (1 + n/T)`` for n = ceil(T/K) chunks (1 + 1/K when K
    divides T; of two K with as many chunks, the smaller, which keeps less, wins). For
    "checkpoint" this chooses how many
    states to keep, ceil(T/K). With slots, "checkpoint" at any K up to 64 keeps as many chunk
    starts as the budget leaves room for, placed by Gruslys et al.'s programme
    (`jaxbptt.slots`), each chunk forward rerun priced as "checkpoint"'s own rerun:
    (1.3 + 0.3 F / n) (1 + n/T) for F reruns of n chunks. (Nested checkpointing,
    ``chunk=(K1, K2, ...)``, is one schedule of the same kind with as many slots,
    never fewer forwards, and more memory; the plan does not offer it.)
    Past a few steps, the least memory is one-step chunks with one slot (an LSTM at
    (T, B, n_x, n_a) = (100, 32, 64, 128): 1.24 MB of XLA temp memory, 1.60 MB with
    two-step chunks).
    Raises ``ValueError`` when nothing fits.
    """
    budget = check_budget(budget)
    plans = []
    for policy in _driver.POLICIES:
        opts = _driver.Options(residuals=policy, default_chunk=default_chunk)
        top = T if policy == "checkpoint" else _driver.chunk_size(T, opts)
        plans += [Plan(policy, K, plan_bytes(policy, K, T, fp))
                  for K in range(1, top + 1)]
    plans += _slot_plans(T, fp, budget)
    fits = [p for p in plans if p.bytes <= budget]
    if not fits:
        if T > 1:  # one-step chunks, one slot: the least of the slot plans
            plans.append(Plan("checkpoint", 1, plan_bytes("checkpoint", 1, T, fp, 1), 1))
        least = min(plans, key=lambda p: p.bytes)
        raise ValueError(f"residuals={budget} bytes is below the least any policy keeps for "
                         f"this run (T={T}): {least.bytes} bytes with "
                         f"residuals={least.residuals!r}, chunk={least.chunk}"
                         + (f", slots={least.slots}" if least.slots else ""))
    return min(fits, key=lambda p: (_time(p, T), p.bytes))


def cell_of(params):
    """``(the driver's cell, the fields' spec)`` of RNN, LSTM or GRU params."""
    from jaxbptt.gru import GRU_CELLS, GRUParams, _spec, gru_variant  # noqa: PLC0415
    from jaxbptt.lstm import _SPEC as _LSTM_SPEC  # noqa: PLC0415
    from jaxbptt.lstm import LSTM_CELL, LSTMParams  # noqa: PLC0415
    from jaxbptt.rnn import _SPEC as _RNN_SPEC  # noqa: PLC0415
    from jaxbptt.rnn import RNN_CELL, RNNParams  # noqa: PLC0415

    if isinstance(params, LSTMParams):
        return LSTM_CELL, _LSTM_SPEC
    if isinstance(params, RNNParams):
        return RNN_CELL, _RNN_SPEC
    if isinstance(params, GRUParams):
        variant = gru_variant(params, None)
        return GRU_CELLS[variant], _spec(variant)
    raise TypeError(f"params must be RNNParams, LSTMParams or GRUParams, got "
                    f"{_checks.kind_of(params)}")


def residual_plan(params, xs, budget: int, *, time_major: bool = True) -> Plan:
    """The plan ``rnn/lstm/gru(params, xs, residuals=budget)`` runs.

    Args:
      params: `RNNParams`, `LSTMParams` or `GRUParams`.
      xs: the inputs (T, B, n_x), or (B, T, n_x) with ``time_major=False``; only
        their shape and dtype are read.
      budget: bytes the forward may keep for the backward.

    Returns:
      a `Plan` ``(residuals, chunk, bytes, slots)``: the policy, the steps per
      chunk, the estimated bytes kept (what stays alive through the backward plus
      one chunk's transients and the weight-sized buffers: an estimate, XLA's
      ``temp_size_in_bytes`` came 0.54-1.14x it, see the README) and,
      for ``"checkpoint"`` keeping fewer chunk starts than chunks, how many.

    Raises:
      ValueError: when no plan fits (the message gives the least possible).
    """
    cell, spec = cell_of(params)
    n_a, n_x, dtype = _checks.params(params, spec)
    xs = _checks.time_major(xs, _checks.flag("time_major", time_major))
    T, B = _checks.sequence(xs, n_x, dtype, time_major)
    return plan(T, footprint(cell, params, B, n_x, n_a, dtype), budget,
                _driver.default_chunk(cell, B, n_a, dtype))
