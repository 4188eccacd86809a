"""Every cell's forward equals a NumPy transcription of its module docstring's equations.

The gradient tests compare the hand-derived backward with JAX's derivative of the same
forward, so they cannot see a wrong forward; PyTorch checks the RNN, the LSTM and the cuDNN
GRU (test_torch), and nothing else checks the course's GRU. Here each step is written out
from the docstrings, on [a<t-1>; x<t>], with no code of the library's.
"""

import numpy as np
import pytest

from cells import CELLS, make, rel_err


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _step(cell, p, a, c, x):
    """One step of ``cell`` from the docstring; returns (a<t>, c<t>) (c is None but for
    the LSTM)."""
    n_a = a.shape[1]
    ax = np.concatenate([a, x], axis=1)  # [a<t-1>; x<t>] as rows

    def lin(W, b, v=ax):
        return v @ W.T + b

    if cell == "rnn":  # a<t> = tanh(Waa a<t-1> + Wax x<t> + ba)
        return np.tanh(a @ p["Waa"].T + x @ p["Wax"].T + p["ba"]), None
    if cell == "lstm":
        f, i = _sigmoid(lin(p["Wf"], p["bf"])), _sigmoid(lin(p["Wi"], p["bi"]))
        cc, o = np.tanh(lin(p["Wc"], p["bc"])), _sigmoid(lin(p["Wo"], p["bo"]))
        c = f * c + i * cc
        return o * np.tanh(c), c
    u, r = _sigmoid(lin(p["Wu"], p["bu"])), _sigmoid(lin(p["Wr"], p["br"]))
    Wch, Wcx = p["Wc"][:, :n_a], p["Wc"][:, n_a:]
    if cell == "gru-course":  # reset before the product
        cc = np.tanh((r * a) @ Wch.T + x @ Wcx.T + p["bc"])
    else:  # cuDNN: reset after the hidden-side product and its own bias
        cc = np.tanh(x @ Wcx.T + p["bc"] + r * (a @ Wch.T + p["bch"]))
    return u * cc + (1 - u) * a, None


@pytest.mark.parametrize("T", [1, 263])  # one step; several chunks, a short last one (every cell)
@pytest.mark.parametrize("cell", CELLS)
def test_forward_equals_numpy_transcription(cell, T):
    fn, params, xs, state0 = make(cell, T, 3, 2, 4)
    p = {k: np.asarray(v) for k, v in params._asdict().items() if v is not None}
    if cell == "lstm":
        a, c = (np.asarray(s) for s in state0)
    else:
        a, c = np.asarray(state0), None
    hs = []
    for x in np.asarray(xs):
        a, c = _step(cell, p, a, c, x)
        hs.append(a)
    final = (a, c) if cell == "lstm" else a
    assert np.max(np.abs(a)) > 1e-3  # not a trivially small state
    for backward in ("bptt", "autodiff"):
        got_hs, got_final = fn(params, xs, state0, backward=backward)
        assert rel_err(got_hs, np.stack(hs)) < 1e-13
        assert rel_err(tuple(got_final) if cell == "lstm" else got_final, final) < 1e-13
