"""Tests of `jaxbptt.ng`, the deeplearning.ai Sequence Models (week 1) API.

What is tested:

1. Every ng function against a plain NumPy transcription of the course's
   equations (written below, the correct BPTT), in float64 at ~1e-12, on random
   shapes including m = 1, T_x = 1, n_x = 1 and a da shorter than x, eagerly and
   under ``jax.jit``, on every device the conftest finds.
2. The course notebook's published expected values ("Building your Recurrent
   Neural Network - Step by Step", Sequence Models week 1, assignment 1; its
   seed-1 test cases), at the printed precision, and the shapes.
3. The well-known trap: an lstm_backward that never carries da_prevt / dc_prevt
   (reproducing the old v3 notebook's printed dx, da0 and dWf; its dbi, dbc and dbo
   match neither that nor the correct BPTT) must disagree with ng.lstm_backward,
   while ng.lstm_backward / ng.rnn_backward agree with ``jax.grad`` of the core
   (`jaxbptt.lstm` / `jaxbptt.rnn`, ``backward="autodiff"``) and with central
   finite differences of the NumPy forward.
4. Every ng function jits and gives the eager values.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbptt
from jaxbptt import ng

# ================================================================ NumPy reference
# A transcription of the course's equations (column layout, x (n_x, m, T_x)).


def np_softmax(x):
    e_x = np.exp(x - np.max(x))
    return e_x / e_x.sum(axis=0)


def np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def np_rnn_cell_forward(xt, a_prev, parameters):
    Wax, Waa, Wya = parameters["Wax"], parameters["Waa"], parameters["Wya"]
    ba, by = parameters["ba"], parameters["by"]
    a_next = np.tanh(np.dot(Waa, a_prev) + np.dot(Wax, xt) + ba)
    yt_pred = np_softmax(np.dot(Wya, a_next) + by)
    cache = (a_next, a_prev, xt, parameters)
    return a_next, yt_pred, cache


def np_rnn_forward(x, a0, parameters):
    caches = []
    n_x, m, T_x = x.shape
    n_y, n_a = parameters["Wya"].shape
    a = np.zeros((n_a, m, T_x))
    y_pred = np.zeros((n_y, m, T_x))
    a_next = a0
    for t in range(T_x):
        a_next, yt_pred, cache = np_rnn_cell_forward(x[:, :, t], a_next, parameters)
        a[:, :, t] = a_next
        y_pred[:, :, t] = yt_pred
        caches.append(cache)
    return a, y_pred, (caches, x)


def np_rnn_cell_backward(da_next, cache):
    a_next, a_prev, xt, parameters = cache
    dtanh = (1 - a_next**2) * da_next
    return {"dxt": np.dot(parameters["Wax"].T, dtanh),
            "da_prev": np.dot(parameters["Waa"].T, dtanh),
            "dWax": np.dot(dtanh, xt.T),
            "dWaa": np.dot(dtanh, a_prev.T),
            "dba": np.sum(dtanh, axis=1, keepdims=True)}


def np_rnn_backward(da, caches):
    caches, x = caches
    a1, a0, x1, parameters = caches[0]
    n_a, m, T_x = da.shape
    n_x, m = x1.shape
    dx = np.zeros((n_x, m, T_x))
    dWax = np.zeros((n_a, n_x))
    dWaa = np.zeros((n_a, n_a))
    dba = np.zeros((n_a, 1))
    da_prevt = np.zeros((n_a, m))
    for t in reversed(range(T_x)):
        g = np_rnn_cell_backward(da[:, :, t] + da_prevt, caches[t])
        da_prevt = g["da_prev"]
        dx[:, :, t] = g["dxt"]
        dWax += g["dWax"]
        dWaa += g["dWaa"]
        dba += g["dba"]
    return {"dx": dx, "da0": da_prevt, "dWax": dWax, "dWaa": dWaa, "dba": dba}


def np_lstm_cell_forward(xt, a_prev, c_prev, parameters):
    p = parameters
    concat = np.concatenate((a_prev, xt), axis=0)
    ft = np_sigmoid(np.dot(p["Wf"], concat) + p["bf"])
    it = np_sigmoid(np.dot(p["Wi"], concat) + p["bi"])
    cct = np.tanh(np.dot(p["Wc"], concat) + p["bc"])
    c_next = ft * c_prev + it * cct
    ot = np_sigmoid(np.dot(p["Wo"], concat) + p["bo"])
    a_next = ot * np.tanh(c_next)
    yt_pred = np_softmax(np.dot(p["Wy"], a_next) + p["by"])
    cache = (a_next, c_next, a_prev, c_prev, ft, it, cct, ot, xt, parameters)
    return a_next, c_next, yt_pred, cache


def np_lstm_forward(x, a0, parameters):
    caches = []
    n_x, m, T_x = x.shape
    n_y, n_a = parameters["Wy"].shape
    a = np.zeros((n_a, m, T_x))
    c = np.zeros((n_a, m, T_x))
    y = np.zeros((n_y, m, T_x))
    a_next = a0
    c_next = np.zeros((n_a, m))
    for t in range(T_x):
        a_next, c_next, yt, cache = np_lstm_cell_forward(x[:, :, t], a_next, c_next, parameters)
        a[:, :, t] = a_next
        c[:, :, t] = c_next
        y[:, :, t] = yt
        caches.append(cache)
    return a, y, c, (caches, x)


def np_lstm_cell_backward(da_next, dc_next, cache):
    a_next, c_next, a_prev, c_prev, ft, it, cct, ot, xt, p = cache
    n_a, m = a_next.shape
    dtanh_c = ot * (1 - np.tanh(c_next)**2) * da_next
    dot = da_next * np.tanh(c_next) * ot * (1 - ot)
    dcct = (dc_next * it + dtanh_c * it) * (1 - cct**2)
    dit = (dc_next * cct + dtanh_c * cct) * it * (1 - it)
    dft = (dc_next * c_prev + dtanh_c * c_prev) * ft * (1 - ft)
    concat = np.concatenate((a_prev, xt), axis=0)
    g = {"dWf": np.dot(dft, concat.T), "dWi": np.dot(dit, concat.T),
         "dWc": np.dot(dcct, concat.T), "dWo": np.dot(dot, concat.T),
         "dbf": np.sum(dft, axis=1, keepdims=True), "dbi": np.sum(dit, axis=1, keepdims=True),
         "dbc": np.sum(dcct, axis=1, keepdims=True), "dbo": np.sum(dot, axis=1, keepdims=True)}
    dz = {"f": dft, "i": dit, "c": dcct, "o": dot}
    g["da_prev"] = sum(np.dot(p["W" + k][:, :n_a].T, dz[k]) for k in "fico")
    g["dc_prev"] = dc_next * ft + dtanh_c * ft
    g["dxt"] = sum(np.dot(p["W" + k][:, n_a:].T, dz[k]) for k in "fico")
    return g


_LSTM_PARAM_GRADS = ("dWf", "dbf", "dWi", "dbi", "dWc", "dbc", "dWo", "dbo")


def _np_lstm_backward(da, caches, carry):
    """The course's lstm_backward; ``carry=False`` is the widespread buggy copy."""
    caches, x = caches
    a1, c1, a0, c0, f1, i1, cc1, o1, x1, parameters = caches[0]
    n_a, m, T_x = da.shape
    n_x, m = x1.shape
    dx = np.zeros((n_x, m, T_x))
    g_sum = {k: np.zeros((n_a, n_a + n_x) if k[1] == "W" else (n_a, 1))
             for k in _LSTM_PARAM_GRADS}
    da_prevt = np.zeros((n_a, m))
    dc_prevt = np.zeros((n_a, m))
    for t in reversed(range(T_x)):
        g = np_lstm_cell_backward(da[:, :, t] + da_prevt, dc_prevt, caches[t])
        if carry:
            da_prevt, dc_prevt = g["da_prev"], g["dc_prev"]
        dx[:, :, t] = g["dxt"]
        for k in _LSTM_PARAM_GRADS:
            g_sum[k] += g[k]
    return {"dx": dx, "da0": g["da_prev"], **g_sum}


def np_lstm_backward(da, caches):
    return _np_lstm_backward(da, caches, carry=True)


def np_lstm_backward_wrong(da, caches):
    """Never updates da_prevt / dc_prevt: the bug of many public copies (old v3 values)."""
    return _np_lstm_backward(da, caches, carry=False)


# ======================================================================== helpers


def rnn_params(rng, n_x, n_a, n_y):
    return {"Wax": rng.standard_normal((n_a, n_x)), "Waa": rng.standard_normal((n_a, n_a)),
            "Wya": rng.standard_normal((n_y, n_a)), "ba": rng.standard_normal((n_a, 1)),
            "by": rng.standard_normal((n_y, 1))}


def lstm_params(rng, n_x, n_a, n_y):
    p = {}
    for g in "fico":
        p["W" + g] = rng.standard_normal((n_a, n_a + n_x))
        p["b" + g] = rng.standard_normal((n_a, 1))
    p["Wy"] = rng.standard_normal((n_y, n_a))
    p["by"] = rng.standard_normal((n_y, 1))
    return p


def run(f, args, device, jit):
    """f(*args) with the args placed on ``device``, eagerly or under jax.jit."""
    args = jax.device_put(args, device)
    return (jax.jit(f) if jit else f)(*args)


def assert_close(got, want, rtol=1e-12, what=""):
    """Same shape, and |got - want| <= rtol * (|want| + max|want|) elementwise."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == np.float64, (what, got.dtype)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = max(np.max(np.abs(want)), np.finfo(np.float64).tiny)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=what)


def assert_tree_close(got, want, rtol=1e-12):
    """Two pytrees (tuples, lists, dicts of arrays) of the same structure, close leaf by leaf."""
    got_leaves, got_def = jax.tree.flatten_with_path(got)
    want_leaves, want_def = jax.tree.flatten_with_path(want)
    assert got_def == want_def
    for (path, g), (_, w) in zip(got_leaves, want_leaves):
        assert_close(g, w, rtol, what=jax.tree_util.keystr(path))


def as_tree(x):
    """A result as plain containers (tuples, lists, dicts) of NumPy arrays."""
    return jax.tree.map(np.asarray, x)


# Random shapes (n_x, n_a, n_y, m, T_x, T_da): T_da is the length of da in the
# backwards (the course reads T_x from da, and may pass fewer steps than x has).
SHAPES = [
    (3, 5, 2, 10, 7, 4),  # the notebook's sizes, da shorter than x
    (1, 4, 3, 1, 5, 5),   # n_x = 1, m = 1
    (2, 3, 1, 4, 1, 1),   # T_x = 1, n_y = 1
]
SHAPE_IDS = ["nx{}-na{}-ny{}-m{}-T{}-Tda{}".format(*s) for s in SHAPES]

MODES = pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
RANDOM_SHAPES = pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)


def _rng(shape, salt):
    return np.random.default_rng([salt, *shape])


# ======================================= 1. ng against the NumPy transcription


@MODES
@RANDOM_SHAPES
def test_rnn_cell_forward_matches_numpy(shape, jit, device):
    n_x, n_a, n_y, m, _, _ = shape
    rng = _rng(shape, 1)
    xt, a_prev = rng.standard_normal((n_x, m)), rng.standard_normal((n_a, m))
    params = rnn_params(rng, n_x, n_a, n_y)
    got = run(ng.rnn_cell_forward, (xt, a_prev, params), device, jit)
    assert_tree_close(as_tree(got), np_rnn_cell_forward(xt, a_prev, params))


@MODES
@RANDOM_SHAPES
def test_rnn_forward_matches_numpy(shape, jit, device):
    n_x, n_a, n_y, m, T_x, _ = shape
    rng = _rng(shape, 2)
    x, a0 = rng.standard_normal((n_x, m, T_x)), rng.standard_normal((n_a, m))
    params = rnn_params(rng, n_x, n_a, n_y)
    got = run(ng.rnn_forward, (x, a0, params), device, jit)
    assert_tree_close(as_tree(got), np_rnn_forward(x, a0, params))


@MODES
@RANDOM_SHAPES
def test_rnn_cell_backward_matches_numpy(shape, jit, device):
    n_x, n_a, n_y, m, _, _ = shape
    rng = _rng(shape, 3)
    xt, a_prev = rng.standard_normal((n_x, m)), rng.standard_normal((n_a, m))
    _, _, cache = np_rnn_cell_forward(xt, a_prev, rnn_params(rng, n_x, n_a, n_y))
    da_next = rng.standard_normal((n_a, m))
    got = run(ng.rnn_cell_backward, (da_next, cache), device, jit)
    assert_tree_close(as_tree(got), np_rnn_cell_backward(da_next, cache))


@MODES
@RANDOM_SHAPES
def test_rnn_backward_matches_numpy(shape, jit, device):
    n_x, n_a, n_y, m, T_x, T_da = shape
    rng = _rng(shape, 4)
    x, a0 = rng.standard_normal((n_x, m, T_x)), rng.standard_normal((n_a, m))
    _, _, caches = np_rnn_forward(x, a0, rnn_params(rng, n_x, n_a, n_y))
    da = rng.standard_normal((n_a, m, T_da))
    got = run(ng.rnn_backward, (da, caches), device, jit)
    assert_tree_close(as_tree(got), np_rnn_backward(da, caches))


@MODES
@RANDOM_SHAPES
def test_lstm_cell_forward_matches_numpy(shape, jit, device):
    n_x, n_a, n_y, m, _, _ = shape
    rng = _rng(shape, 5)
    xt = rng.standard_normal((n_x, m))
    a_prev, c_prev = rng.standard_normal((n_a, m)), rng.standard_normal((n_a, m))
    params = lstm_params(rng, n_x, n_a, n_y)
    got = run(ng.lstm_cell_forward, (xt, a_prev, c_prev, params), device, jit)
    assert_tree_close(as_tree(got), np_lstm_cell_forward(xt, a_prev, c_prev, params))


@MODES
@RANDOM_SHAPES
def test_lstm_forward_matches_numpy(shape, jit, device):
    n_x, n_a, n_y, m, T_x, _ = shape
    rng = _rng(shape, 6)
    x, a0 = rng.standard_normal((n_x, m, T_x)), rng.standard_normal((n_a, m))
    params = lstm_params(rng, n_x, n_a, n_y)
    got = run(ng.lstm_forward, (x, a0, params), device, jit)
    assert_tree_close(as_tree(got), np_lstm_forward(x, a0, params))


@MODES
@RANDOM_SHAPES
def test_lstm_cell_backward_matches_numpy(shape, jit, device):
    n_x, n_a, n_y, m, _, _ = shape
    rng = _rng(shape, 7)
    xt = rng.standard_normal((n_x, m))
    a_prev, c_prev = rng.standard_normal((n_a, m)), rng.standard_normal((n_a, m))
    _, _, _, cache = np_lstm_cell_forward(xt, a_prev, c_prev, lstm_params(rng, n_x, n_a, n_y))
    da_next, dc_next = rng.standard_normal((n_a, m)), rng.standard_normal((n_a, m))
    got = run(ng.lstm_cell_backward, (da_next, dc_next, cache), device, jit)
    assert_tree_close(as_tree(got), np_lstm_cell_backward(da_next, dc_next, cache))


@MODES
@RANDOM_SHAPES
def test_lstm_backward_matches_numpy(shape, jit, device):
    n_x, n_a, n_y, m, T_x, T_da = shape
    rng = _rng(shape, 8)
    x, a0 = rng.standard_normal((n_x, m, T_x)), rng.standard_normal((n_a, m))
    _, _, _, caches = np_lstm_forward(x, a0, lstm_params(rng, n_x, n_a, n_y))
    da = rng.standard_normal((n_a, m, T_da))
    got = run(ng.lstm_backward, (da, caches), device, jit)
    assert_tree_close(as_tree(got), np_lstm_backward(da, caches))


# ========================================= 2. the notebook's published values
# Inputs built exactly as in the notebook (np.random.seed(1), then randn in order).


def assert_published(got, printed):
    """``got`` equals the notebook's printout to one unit in its last printed place."""
    numbers = re.findall(r"-?\d+\.\d+", printed)
    want = np.array([float(s) for s in numbers]).reshape(np.shape(got))
    decimals = max(len(s.split(".")[1]) for s in numbers)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=10.0**-decimals,
                               err_msg=printed)


def case_rnn_cell_forward():
    r = np.random.RandomState(1)
    xt, a_prev = r.randn(3, 10), r.randn(5, 10)
    p = {"Waa": r.randn(5, 5), "Wax": r.randn(5, 3), "Wya": r.randn(2, 5),
         "ba": r.randn(5, 1), "by": r.randn(2, 1)}
    return xt, a_prev, p


def case_rnn_forward():
    r = np.random.RandomState(1)
    x, a0 = r.randn(3, 10, 4), r.randn(5, 10)
    p = {"Waa": r.randn(5, 5), "Wax": r.randn(5, 3), "Wya": r.randn(2, 5),
         "ba": r.randn(5, 1), "by": r.randn(2, 1)}
    return x, a0, p


def _lstm_case_params(r, with_output=True):
    p = {}
    for g in "fioc":  # the notebook's drawing order
        p["W" + g] = r.randn(5, 5 + 3)
        p["b" + g] = r.randn(5, 1)
    if with_output:
        p["Wy"], p["by"] = r.randn(2, 5), r.randn(2, 1)
    else:
        p["Wy"], p["by"] = np.zeros((2, 5)), np.zeros((2, 1))
    return p


def case_lstm_cell_forward():
    r = np.random.RandomState(1)
    xt, a_prev, c_prev = r.randn(3, 10), r.randn(5, 10), r.randn(5, 10)
    return xt, a_prev, c_prev, _lstm_case_params(r)


def case_lstm_forward():
    r = np.random.RandomState(1)
    x, a0 = r.randn(3, 10, 7), r.randn(5, 10)
    return x, a0, _lstm_case_params(r)


def case_rnn_cell_backward():
    """(da_next, cache) of the notebook, cache from ng.rnn_cell_forward."""
    r = np.random.RandomState(1)
    xt, a_prev = r.randn(3, 10), r.randn(5, 10)
    p = {"Wax": r.randn(5, 3), "Waa": r.randn(5, 5), "Wya": r.randn(2, 5),
         "ba": r.randn(5, 1), "by": r.randn(2, 1)}
    _, _, cache = ng.rnn_cell_forward(xt, a_prev, p)
    return r.randn(5, 10), cache


def case_rnn_backward():
    r = np.random.RandomState(1)
    x, a0 = r.randn(3, 10, 4), r.randn(5, 10)
    p = {"Wax": r.randn(5, 3), "Waa": r.randn(5, 5), "Wya": r.randn(2, 5),
         "ba": r.randn(5, 1), "by": r.randn(2, 1)}
    _, _, caches = ng.rnn_forward(x, a0, p)
    return r.randn(5, 10, 4), caches


def case_lstm_cell_backward():
    r = np.random.RandomState(1)
    xt, a_prev, c_prev = r.randn(3, 10), r.randn(5, 10), r.randn(5, 10)
    p = _lstm_case_params(r)
    _, _, _, cache = ng.lstm_cell_forward(xt, a_prev, c_prev, p)
    return r.randn(5, 10), r.randn(5, 10), cache


def case_lstm_backward():
    """(da, caches): 7 steps forward, da over only the first 4 (as in the notebook)."""
    r = np.random.RandomState(1)
    x, a0 = r.randn(3, 10, 7), r.randn(5, 10)
    p = _lstm_case_params(r, with_output=False)
    _, _, _, caches = ng.lstm_forward(x, a0, p)
    return r.randn(5, 10, 4), caches


def test_published_rnn_cell_forward():
    a_next, yt_pred, cache = ng.rnn_cell_forward(*case_rnn_cell_forward())
    assert a_next.shape == (5, 10) and yt_pred.shape == (2, 10)
    assert_published(a_next[4], "[ 0.59584544 0.18141802 0.61311866 0.99808218 0.85016201 "
                                "0.99980978 -0.18887155 0.99815551 0.6531151 0.82872037]")
    assert_published(yt_pred[1], "[0.9888161 0.01682021 0.21140899 0.36817467 0.98988387 "
                                 "0.88945212 0.36920224 0.9966312 0.9982559 0.17746526]")
    assert len(cache) == 4


def test_published_rnn_forward():
    a, y_pred, caches = ng.rnn_forward(*case_rnn_forward())
    assert a.shape == (5, 10, 4) and y_pred.shape == (2, 10, 4)
    assert_published(a[4][1], "[-0.99999375 0.77911235 -0.99861469 -0.99833267]")
    assert_published(y_pred[1][3], "[0.79560373 0.86224861 0.11118257 0.81515947]")
    assert_published(caches[1][1][3], "[-1.1425182 -0.34934272 -0.20889423 0.58662319]")
    assert len(caches) == 2 and len(caches[0]) == 4


def test_published_lstm_cell_forward():
    a_next, c_next, yt, cache = ng.lstm_cell_forward(*case_lstm_cell_forward())
    assert a_next.shape == c_next.shape == (5, 10) and yt.shape == (2, 10)
    assert_published(a_next[4], "[-0.66408471 0.0036921 0.02088357 0.22834167 -0.85575339 "
                                "0.00138482 0.76566531 0.34631421 -0.00215674 0.43827275]")
    assert_published(c_next[2], "[0.63267805 1.00570849 0.35504474 0.20690913 -1.64566718 "
                                "0.11832942 0.76449811 -0.0981561 -0.74348425 -0.26810932]")
    assert_published(yt[1], "[0.79913913 0.15986619 0.22412122 0.15606108 0.97057211 "
                            "0.31146381 0.00943007 0.12666353 0.39380172 0.07828381]")
    assert_published(cache[1][3], "[-0.16263996 1.03729328 0.72938082 -0.54101719 0.02752074 "
                                  "-0.30821874 0.07651101 -1.03752894 1.41219977 -0.37647422]")
    assert len(cache) == 10


def test_published_lstm_forward():
    a, y, c, caches = ng.lstm_forward(*case_lstm_forward())
    assert a.shape == c.shape == (5, 10, 7) and y.shape == (2, 10, 7)
    assert_published(a[4][3][6], "0.172117767533")
    assert_published(y[1][4][3], "0.95087346185")
    assert_published(caches[1][1][1], "[0.82797464 0.23009474 0.76201118 -0.22232814 "
                                      "-0.20075807 0.18656139 0.41005165]")
    assert_published(c[1][2][1], "-0.855544916718")
    assert len(caches) == 2 and len(caches[0]) == 7


def test_published_rnn_cell_backward():
    g = ng.rnn_cell_backward(*case_rnn_cell_backward())
    assert g["dxt"].shape == (3, 10) and g["da_prev"].shape == (5, 10)
    assert g["dWax"].shape == (5, 3) and g["dWaa"].shape == (5, 5) and g["dba"].shape == (5, 1)
    assert_published(g["dxt"][1][2], "-1.3872130506")
    assert_published(g["da_prev"][2][3], "-0.152399493774")
    assert_published(g["dWax"][3][1], "0.410772824935")
    assert_published(g["dWaa"][1][2], "1.15034506685")
    assert_published(g["dba"][4], "[0.20023491]")


def test_published_rnn_backward():
    g = ng.rnn_backward(*case_rnn_backward())
    assert g["dx"].shape == (3, 10, 4) and g["da0"].shape == (5, 10)
    assert g["dWax"].shape == (5, 3) and g["dWaa"].shape == (5, 5) and g["dba"].shape == (5, 1)
    assert_published(g["dx"][1][2], "[-2.07101689 -0.59255627 0.02466855 0.01483317]")
    assert_published(g["da0"][2][3], "-0.314942375127")
    assert_published(g["dWax"][3][1], "11.2641044965")
    assert_published(g["dWaa"][1][2], "2.30333312658")
    assert_published(g["dba"][4], "[-0.74747722]")


def test_published_lstm_cell_backward():
    g = ng.lstm_cell_backward(*case_lstm_cell_backward())
    assert g["dxt"].shape == (3, 10)
    assert g["da_prev"].shape == g["dc_prev"].shape == (5, 10)
    for k in "fico":
        assert g["dW" + k].shape == (5, 8) and g["db" + k].shape == (5, 1)
    assert_published(g["dxt"][1][2], "3.23055911511")
    assert_published(g["da_prev"][2][3], "-0.0639621419711")
    assert_published(g["dc_prev"][2][3], "0.797522038797")
    assert_published(g["dWf"][3][1], "-0.147954838164")
    assert_published(g["dWi"][1][2], "1.05749805523")
    assert_published(g["dWc"][3][1], "2.30456216369")
    assert_published(g["dWo"][1][2], "0.331311595289")
    assert_published(g["dbf"][4], "[0.18864637]")
    assert_published(g["dbi"][4], "[-0.40142491]")
    assert_published(g["dbc"][4], "[0.25587763]")
    assert_published(g["dbo"][4], "[0.13893342]")


def test_published_lstm_backward():
    g = ng.lstm_backward(*case_lstm_backward())
    assert set(g) == {"dx", "da0", *_LSTM_PARAM_GRADS}
    assert g["dx"].shape == (3, 10, 4) and g["da0"].shape == (5, 10)
    for k in "fico":
        assert g["dW" + k].shape == (5, 8) and g["db" + k].shape == (5, 1)
    assert_published(g["dx"][1][2], "[0.00218254 0.28205375 -0.48292508 -0.43281115]")
    assert_published(g["da0"][2][3], "0.312770310257")
    assert_published(g["dWf"][3][1], "-0.0809802310938")
    assert_published(g["dWi"][1][2], "0.40512433093")
    assert_published(g["dWc"][3][1], "-0.0793746735512")
    assert_published(g["dWo"][1][2], "0.038948775763")
    assert_published(g["dbf"][4], "[-0.15745657]")
    assert_published(g["dbi"][4], "[-0.50848333]")
    assert_published(g["dbc"][4], "[-0.42510818]")
    assert_published(g["dbo"][4], "[-0.17958196]")


# ============================ 3. the lstm_backward trap, and gradient checks


def _lstm_case_numpy():
    """The published lstm_backward case with the NumPy forward's caches."""
    r = np.random.RandomState(1)
    x, a0 = r.randn(3, 10, 7), r.randn(5, 10)
    p = _lstm_case_params(r, with_output=False)
    _, _, _, caches = np_lstm_forward(x, a0, p)
    return x, a0, p, r.randn(5, 10, 4), caches


def test_wrong_lstm_backward_reproduces_old_values_and_disagrees_with_ng():
    *_, da, np_caches = _lstm_case_numpy()
    wrong = np_lstm_backward_wrong(da, np_caches)
    # The reference for the bug is faithful: it gives the old v3 notebook's values...
    assert_published(wrong["dx"][1][2], "[-0.00173313 0.08287442 -0.30545663 -0.43281115]")
    assert_published(wrong["da0"][2][3], "-0.095911501954")
    assert_published(wrong["dWf"][3][1], "-0.0698198561274")
    # ...and ng gives something else: all but the last step's dx, and every total.
    got = as_tree(ng.lstm_backward(da, np_caches))
    assert np.allclose(got["dx"][:, :, -1], wrong["dx"][:, :, -1], rtol=1e-12, atol=1e-12)
    for k in ("da0", *_LSTM_PARAM_GRADS):
        assert not np.allclose(got[k], wrong[k], rtol=1e-3, atol=1e-3), k
    for t in range(da.shape[2] - 1):
        assert not np.allclose(got["dx"][:, :, t], wrong["dx"][:, :, t], rtol=1e-3, atol=1e-3), t


def _core_lstm_params(p):
    return jaxbptt.LSTMParams(*(jnp.asarray(p[k + g])[:, 0] if k == "b" else jnp.asarray(p[k + g])
                                for g in "fico" for k in "Wb"))


def _lstm_grads_by_autodiff(x, a0, p, da):
    """jax.grad of L = sum(a[:, :, :T] * da) through jaxbptt.lstm (backward="autodiff")."""
    T = da.shape[2]

    def loss(params, xs, a0_rows):
        state0 = jaxbptt.LSTMState(a0_rows, jnp.zeros_like(a0_rows))
        hs, _ = jaxbptt.lstm(params, xs, state0, backward="autodiff")
        return jnp.sum(hs * jnp.transpose(da, (2, 1, 0)))

    xs = jnp.transpose(jnp.asarray(x[:, :, :T]), (2, 1, 0))
    dparams, dxs, da0 = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(
        _core_lstm_params(p), xs, jnp.asarray(a0.T))
    want = {"dx": np.transpose(np.asarray(dxs), (2, 1, 0)), "da0": np.asarray(da0).T}
    for k in _LSTM_PARAM_GRADS:
        g = np.asarray(getattr(dparams, k[1:]))
        want[k] = g[:, None] if k[1] == "b" else g
    return want


def _rnn_grads_by_autodiff(x, a0, p, da):
    """jax.grad of L = sum(a[:, :, :T] * da) through jaxbptt.rnn (backward="autodiff")."""
    T = da.shape[2]

    def loss(params, xs, a0_rows):
        hs, _ = jaxbptt.rnn(params, xs, a0_rows, backward="autodiff")
        return jnp.sum(hs * jnp.transpose(da, (2, 1, 0)))

    params = jaxbptt.RNNParams(jnp.asarray(p["Wax"]), jnp.asarray(p["Waa"]),
                               jnp.asarray(p["ba"][:, 0]))
    xs = jnp.transpose(jnp.asarray(x[:, :, :T]), (2, 1, 0))
    dparams, dxs, da0 = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, xs, jnp.asarray(a0.T))
    return {"dx": np.transpose(np.asarray(dxs), (2, 1, 0)), "da0": np.asarray(da0).T,
            "dWax": np.asarray(dparams.Wax), "dWaa": np.asarray(dparams.Waa),
            "dba": np.asarray(dparams.ba)[:, None]}


def test_lstm_backward_matches_jax_grad():
    """The notebook's lstm_backward case (7 steps forward, da over the first 4)."""
    x, a0, p, da, np_caches = _lstm_case_numpy()
    _, _, _, caches = jax.jit(ng.lstm_forward)(x, a0, p)
    got = as_tree(jax.jit(ng.lstm_backward)(da, caches))
    want = _lstm_grads_by_autodiff(x, a0, p, da)
    assert_tree_close(got, want)
    # The check has teeth: the buggy backward is far from jax.grad.
    wrong = np_lstm_backward_wrong(da, np_caches)
    assert not np.allclose(wrong["da0"], want["da0"], rtol=1e-3, atol=1e-3)


def test_rnn_backward_matches_jax_grad():
    """The notebook's rnn_backward case."""
    r = np.random.RandomState(1)
    x, a0 = r.randn(3, 10, 4), r.randn(5, 10)
    p = {"Wax": r.randn(5, 3), "Waa": r.randn(5, 5), "Wya": r.randn(2, 5),
         "ba": r.randn(5, 1), "by": r.randn(2, 1)}
    da = r.randn(5, 10, 4)
    _, _, caches = jax.jit(ng.rnn_forward)(x, a0, p)
    got = as_tree(jax.jit(ng.rnn_backward)(da, caches))
    assert_tree_close(got, _rnn_grads_by_autodiff(x, a0, p, da))


def _directional_fd(loss, arrays, direction, h=1e-5):
    """Central difference of ``loss`` along ``direction`` (dicts of arrays). Its error is
    O(h^2) from truncation plus about eps |loss| / h from rounding: within 3e-10 (LSTM) and
    3e-9 (RNN) of the analytic value relative, measured, so the tests below allow 1e-8."""
    plus = {k: v + h * direction[k] for k, v in arrays.items()}
    minus = {k: v - h * direction[k] for k, v in arrays.items()}
    return (loss(plus) - loss(minus)) / (2 * h)


def test_lstm_backward_matches_finite_differences():
    """Independent of jaxbptt: the NumPy forward, differenced along a random direction."""
    x, a0, p, da, np_caches = _lstm_case_numpy()
    T = da.shape[2]
    weights = [k + g for g in "fico" for k in "Wb"]  # Wy, by do not reach a
    arrays = {"x": x[:, :, :T], "a0": a0, **{k: p[k] for k in weights}}

    def loss(v):
        a, _, _, _ = np_lstm_forward(v["x"], v["a0"], {**p, **{k: v[k] for k in weights}})
        return np.sum(a * da)

    direction = {k: np.random.default_rng(11 + i).standard_normal(v.shape)
                 for i, (k, v) in enumerate(arrays.items())}
    fd = _directional_fd(loss, arrays, direction)

    def along(g):
        return sum(np.sum(g["d" + k] * direction[k]) for k in arrays)

    _, _, _, caches = ng.lstm_forward(x, a0, p)
    np.testing.assert_allclose(along(as_tree(ng.lstm_backward(jnp.asarray(da), caches))), fd,
                               rtol=1e-8)
    assert not np.isclose(along(np_lstm_backward_wrong(da, np_caches)), fd, rtol=1e-3)


def test_rnn_backward_matches_finite_differences():
    x, a0, p = case_rnn_forward()
    da = np.random.default_rng(12).standard_normal((5, 10, 4))
    arrays = {"x": x, "a0": a0, "Wax": p["Wax"], "Waa": p["Waa"], "ba": p["ba"]}

    def loss(v):
        a, _, _ = np_rnn_forward(v["x"], v["a0"], {**p, **{k: v[k] for k in p if k in v}})
        return np.sum(a * da)

    direction = {k: np.random.default_rng(13 + i).standard_normal(v.shape)
                 for i, (k, v) in enumerate(arrays.items())}
    _, _, caches = ng.rnn_forward(x, a0, p)
    g = as_tree(ng.rnn_backward(jnp.asarray(da), caches))
    analytic = sum(np.sum(g["d" + k] * direction[k]) for k in arrays)
    np.testing.assert_allclose(analytic, _directional_fd(loss, arrays, direction), rtol=1e-8)


# ============================================== 4. jittable, and equal to eager


JIT_CASES = {
    "rnn_cell_forward": (ng.rnn_cell_forward, case_rnn_cell_forward),
    "rnn_forward": (ng.rnn_forward, case_rnn_forward),
    "rnn_cell_backward": (ng.rnn_cell_backward, case_rnn_cell_backward),
    "rnn_backward": (ng.rnn_backward, case_rnn_backward),
    "lstm_cell_forward": (ng.lstm_cell_forward, case_lstm_cell_forward),
    "lstm_forward": (ng.lstm_forward, case_lstm_forward),
    "lstm_cell_backward": (ng.lstm_cell_backward, case_lstm_cell_backward),
    "lstm_backward": (ng.lstm_backward, case_lstm_backward),
}


@pytest.mark.parametrize("name", list(JIT_CASES))
def test_jit_equals_eager(name, device):
    f, case = JIT_CASES[name]
    args = jax.device_put(case(), device)
    eager = f(*args)
    jitted = jax.jit(f)(*args)
    assert all(leaf.devices() == {device} for leaf in jax.tree.leaves(jitted))
    assert_tree_close(as_tree(jitted), as_tree(eager), rtol=1e-13)


# ============================================== 5. bad input names the course's shapes


def test_bad_input_is_named_in_the_course_layout():
    x, a0, p = case_rnn_forward()  # x (3, 10, 4), a0 (5, 10): n_x 3, m 10, n_a 5, n_y 2
    with pytest.raises(ValueError, match=r"a0 has shape \(5, 1\), expected \(n_a=5, m=10\)"):
        ng.rnn_forward(x, a0[:, :1], p)
    with pytest.raises(TypeError, match="a0 is int32 but the parameters are float64"):
        ng.rnn_forward(x, a0.astype(np.int32), p)
    with pytest.raises(ValueError, match=r"x has shape \(4, 10, 3\), expected \(n_x=3, m, T_x\)"):
        ng.rnn_forward(np.transpose(x, (2, 1, 0)), a0, p)
    with pytest.raises(ValueError, match=r"parameters\['ba'\] has shape \(5,\), expected a column"):
        ng.rnn_forward(x, a0, {**p, "ba": p["ba"][:, 0]})
    with pytest.raises(ValueError, match=r"parameters\['by'\] has shape \(2, 10\)"):
        ng.rnn_forward(x, a0, {**p, "by": np.zeros((2, 10))})
    with pytest.raises(ValueError, match=r"parameters\['Wya'\] has shape \(5, 2\)"):
        ng.rnn_forward(x, a0, {**p, "Wya": p["Wya"].T})
    xt, a_prev, c_prev, pc = case_lstm_cell_forward()
    with pytest.raises(ValueError, match=r"c_prev has shape \(10, 5\), expected \(n_a=5, m=10\)"):
        ng.lstm_cell_forward(xt, a_prev, c_prev.T, pc)
    with pytest.raises(TypeError, match="c_prev must be an array, got NoneType"):
        ng.lstm_cell_forward(xt, a_prev, None, pc)
    with pytest.raises(ValueError, match=r"xt has shape \(3,\), expected \(n_x=3, m\)"):
        ng.lstm_cell_forward(xt[:, 0], a_prev, c_prev, pc)
    with pytest.raises(ValueError, match=r"xt has shape \(3,\), expected \(n_x=3, m\)"):
        ng.rnn_cell_forward(x[:, 0, 0], a0, p)
    with pytest.raises(TypeError, match="a_prev must be an array, got NoneType"):
        ng.rnn_cell_forward(x[:, :, 0], None, p)
    with pytest.raises(TypeError, match="a0 must be an array, got NoneType"):
        ng.rnn_forward(x, None, p)
    with pytest.raises(ValueError, match="parameters lacks Waa: the course's dict holds Wax, "
                                         "Waa, ba"):
        ng.rnn_forward(x, a0, {k: v for k, v in p.items() if k != "Waa"})
    with pytest.raises(ValueError, match="parameters lacks by"):
        ng.rnn_forward(x, a0, {k: v for k, v in p.items() if k != "by"})
    with pytest.raises(TypeError, match="parameters must be a dict, as in the course, got list"):
        ng.rnn_forward(x, a0, list(p.values()))
    xl, a0l, pl = case_lstm_forward()
    with pytest.raises(ValueError, match=r"x has shape \(3, 10\), expected \(n_x=3, m, T_x\)"):
        ng.lstm_forward(xl[:, :, 0], a0l, pl)
    with pytest.raises(TypeError, match="a0 must be an array, got NoneType"):
        ng.lstm_forward(xl, None, pl)
    with pytest.raises(ValueError, match="parameters lacks bi: "):
        ng.lstm_forward(xl, a0l, {k: v for k, v in pl.items() if k not in ("bi", "Wy")})


def test_caches_of_another_cell_or_function_are_refused():
    da, rnn_caches = case_rnn_backward()
    lstm_caches = ng.lstm_forward(*case_lstm_forward())[3]
    with pytest.raises(TypeError, match="every step cache in caches must be rnn_forward's, a "
                                        "tuple of 4 entries, got a tuple of 10, an LSTM's"):
        ng.rnn_backward(da, lstm_caches)
    with pytest.raises(TypeError, match="must be lstm_forward's, a tuple of 10 entries, got a "
                                        "tuple of 4, an RNN's"):
        ng.lstm_backward(da, rnn_caches)
    with pytest.raises(TypeError, match=r"caches must be rnn_forward's, \(a list of step "
                                        r"caches, x\), got NoneType"):
        ng.rnn_backward(da, None)
    with pytest.raises(TypeError, match="cache must be rnn_cell_forward's, a tuple of 4 "
                                        "entries, got a tuple of 10, an LSTM's"):
        ng.rnn_cell_backward(da[:, :, 0], lstm_caches[0][0])
    with pytest.raises(TypeError, match="cache must be lstm_cell_forward's, a tuple of 10 "
                                        "entries, got dict"):
        ng.lstm_cell_backward(da[:, :, 0], da[:, :, 0], {})


def test_numpy_float64_with_jax_s_default_float32():
    # The course's arrays are NumPy float64; with x64 off (JAX's default) they run in
    # float32, the LSTM's c0 included, as they do under jit.
    x, a0, p = case_lstm_forward()
    a64, y64, c64, _ = ng.lstm_forward(x, a0, p)
    with jax.enable_x64(False):
        a, y, c, caches = ng.lstm_forward(x, a0, p)
        g = ng.lstm_backward(np.ones(a.shape, np.float64), caches)
    assert a.dtype == c.dtype == jnp.float32 and g["dWf"].dtype == jnp.float32
    np.testing.assert_allclose(a, a64, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c, c64, rtol=1e-5, atol=1e-6)


def test_a_wrong_upstream_gradient_is_refused_not_broadcast():
    da, caches = case_rnn_backward()  # da (5, 10, 4), caches of 4 steps
    for bad in (da[:, :1], da[:1], da[:, :, :0], np.concatenate([da, da], axis=2)):
        with pytest.raises(ValueError, match=r"da has shape .*expected \(n_a=5, m=10, T_x\)"
                                             r"|T_x must be from 1 to the 4 steps"):
            ng.rnn_backward(bad, caches)
    with pytest.raises(ValueError, match=r"da_next has shape \(5, 1\)"):
        ng.rnn_cell_backward(da[:, :1, 0], caches[0][0])
    with pytest.raises(ValueError, match=r"da has shape \(1, 10, 4\)"):
        ng.lstm_backward(da[:1], ng.lstm_forward(*case_lstm_forward())[3])
