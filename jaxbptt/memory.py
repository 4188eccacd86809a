"""Residuals for a memory budget: ``residuals=<bytes>`` and `residual_plan`.

Give any sequence function ``residuals=`` a number of bytes instead of a policy
name and the forward keeps the fastest plan whose estimate fits: ``"gates"``,
then ``"states"``, each at its default chunk and then smaller ones, then
``"checkpoint"`` with as many kept states as the budget allows (see
`jaxbptt._driver.plan`). `residual_plan` says what a call would choose.
"""

from __future__ import annotations

from jaxbptt import _checks, _driver
from jaxbptt.gru import GRU_CELLS, GRUParams, _spec, gru_variant
from jaxbptt.lstm import _SPEC as _LSTM_SPEC
from jaxbptt.lstm import LSTM_CELL, LSTMParams
from jaxbptt.rnn import _SPEC as _RNN_SPEC
from jaxbptt.rnn import RNN_CELL, RNNParams


def _cell(params):
    if isinstance(params, LSTMParams):
        return LSTM_CELL, _LSTM_SPEC
    if isinstance(params, RNNParams):
        return RNN_CELL, _RNN_SPEC
    if isinstance(params, GRUParams):
        variant = gru_variant(params, None)
        return GRU_CELLS[variant], _spec(variant)
    raise TypeError(f"params must be RNNParams, LSTMParams or GRUParams, got "
                    f"{type(params).__name__}")


def residual_plan(params, xs, budget: int, *, time_major: bool = True) -> _driver.Plan:
    """The plan ``rnn/lstm/gru(params, xs, residuals=budget)`` runs.

    Args:
      params: `RNNParams`, `LSTMParams` or `GRUParams`.
      xs: the inputs (T, B, n_x), or (B, T, n_x) with ``time_major=False``; only
        their shape and dtype are read.
      budget: bytes the forward may keep for the backward.

    Returns:
      a `Plan` ``(residuals, chunk, bytes)``: the policy, the steps per chunk and
      the estimated bytes kept (what stays alive through the backward plus one
      chunk's transients and the weight-sized buffers; within about 15 % of
      XLA's ``temp_size_in_bytes`` for the LSTM at the benchmark's shapes).

    Raises:
      ValueError: when no plan fits (the message gives the least possible).
    """
    cell, spec = _cell(params)
    n_a, n_x, dtype = _checks.params(params, spec)
    xs = _checks.time_major(xs, time_major)
    T, B = _checks.sequence(xs, n_x, dtype)
    return _driver.plan(T, *_driver.footprint(cell, params, B, n_x, n_a, dtype), budget)
