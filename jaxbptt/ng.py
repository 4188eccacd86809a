"""The Sequence Models course's functions, names and layout, on jaxbptt's core.

Arrays are columns, as in the course: ``x`` is (n_x, m, T_x), ``a`` is
(n_a, m, T_x), a single step ``xt`` is (n_x, m); biases are (n, 1). Parameters are
dicts with the course's keys. The forwards run the core cells
(`jaxbptt.rnn`, `jaxbptt.lstm`); the backwards run the core's BPTT reverse scan
(``_driver.backward``) on the course's caches, so ``rnn_cell_backward`` is the
same code as ``rnn_backward`` with T_x = 1. Every function is jittable.

Float64 needs ``jax.config.update("jax_enable_x64", True)``; otherwise JAX computes
in float32 (the course's published values then agree to about 1e-6).
"""

from __future__ import annotations

import collections.abc

import jax
import jax.numpy as jnp

from jaxbptt import _checks, _driver
from jaxbptt.lstm import LSTM_CELL, LSTMParams, LSTMState
from jaxbptt.lstm import _SPEC as _LSTM_SPEC
from jaxbptt.lstm import _Gates
from jaxbptt.rnn import RNN_CELL, RNNParams
from jaxbptt.rnn import _SPEC as _RNN_SPEC

_LSTM_GATES = ("f", "i", "c", "o")


def softmax(x):
    """The course's softmax: over axis 0 (the classes of each column)."""
    return jax.nn.softmax(x, axis=0)


def _col(b):
    return b[:, None]


def _cols(name, x, shape, dtype, dims):
    """Checks a course-layout array: ``shape`` (None: any size) and ``dtype``."""
    got, dt = _checks.shape_dtype(name, x)
    if len(got) != len(shape) or any(w is not None and g != w for g, w in zip(got, shape)):
        want = ", ".join(f"{d}={w}" if w is not None else d for d, w in zip(dims, shape))
        raise ValueError(f"{name} has shape {got}, expected ({want})")
    # (as JAX computes them: NumPy float64 is float32 when x64 is off, as under jit)
    canonical = jax.dtypes.canonicalize_dtype
    if canonical(dt) != canonical(dtype):
        raise TypeError(f"{name} is {dt} but the parameters are {dtype}; cast one of them")


def _keys(parameters, keys):
    """``parameters`` must be a dict holding ``keys`` (the course's names)."""
    if not isinstance(parameters, collections.abc.Mapping):
        raise TypeError(f"parameters must be a dict, as in the course, got "
                        f"{type(parameters).__name__}")
    missing = [k for k in keys if k not in parameters]
    if missing:
        raise ValueError(f"parameters lacks {', '.join(missing)}: the course's dict holds "
                         f"{', '.join(keys)}")


def _bias(parameters, key):
    b = parameters[key]
    n = _checks.shape_dtype(key, b)[0]
    if len(n) != 2 or n[1] != 1:
        raise ValueError(f"parameters['{key}'] has shape {n}, expected a column (n, 1)")
    return b[:, 0]


def _rnn_params(parameters):
    _keys(parameters, ("Wax", "Waa", "ba"))
    p = RNNParams(parameters["Wax"], parameters["Waa"], _bias(parameters, "ba"))
    _checks.params(p, _RNN_SPEC)
    return p


def _lstm_params(parameters):
    _keys(parameters, tuple(k + g for g in _LSTM_GATES for k in "Wb"))
    p = LSTMParams(*(parameters[k + g] if k == "W" else _bias(parameters, k + g)
                     for g in _LSTM_GATES for k in "Wb"))
    _checks.params(p, _LSTM_SPEC)
    return p


def _inputs(parameters, W, n_x, x, states, step=False):
    """Checks x (n_x, m, T_x) (one step's xt (n_x, m) if ``step``), the initial states
    (a dict name -> (n_a, m) array) and the output layer W (n_y, n_a), by (n_y, 1)
    against the cell's parameters (n_a, n_x, dtype read from ``W`` first)."""
    dtype, n_a = parameters[W].dtype, parameters[W].shape[0]
    if step:
        _cols("xt", x, (n_x, None), dtype, ("n_x", "m"))
    else:
        _cols("x", x, (n_x, None, None), dtype, ("n_x", "m", "T_x"))
        if x.shape[2] < 1:
            raise ValueError(f"x must hold at least one time step, got shape {tuple(x.shape)}")
    m = x.shape[1]
    for name, s in states.items():
        _cols(name, s, (n_a, m), dtype, ("n_a", "m"))
    out = "Wya" if W == "Wax" else "Wy"  # the course's names: Wya (RNN), Wy (LSTM)
    _keys(parameters, (out, "by"))
    _cols(f"parameters['{out}']", parameters[out], (None, n_a), dtype, ("n_y", "n_a"))
    n_y = parameters[out].shape[0]
    _cols("parameters['by']", parameters["by"], (n_y, 1), dtype, ("n_y", "1"))


def _cache(cache, n, what, fn):
    """``cache`` as ``fn`` makes it: a tuple of ``n`` entries (RNN 4, LSTM 10)."""
    if isinstance(cache, (tuple, list)) and len(cache) == n:
        return cache
    got = type(cache).__name__
    if isinstance(cache, (tuple, list)):
        cell = {4: "an RNN's", 10: "an LSTM's"}.get(len(cache))
        got = f"a {got} of {len(cache)}" + (f", {cell}" if cell else "")
    raise TypeError(f"{what} must be {fn}'s, a tuple of {n} entries, got {got}")


def _steps(caches, n, fn):
    """The step caches in ``fn``'s ``caches = (list of step caches, x)``."""
    if not (isinstance(caches, (tuple, list)) and len(caches) == 2
            and isinstance(caches[0], (tuple, list)) and caches[0]):
        raise TypeError(f"caches must be {fn}'s, (a list of step caches, x), got "
                        f"{type(caches).__name__}")
    return [_cache(c, n, "every step cache in caches", fn) for c in caches[0]]


def _cotangent(name, d, like, T_max=None):
    """Checks an upstream gradient shaped like ``like`` (n_a, m), or (n_a, m, T) with
    1 <= T <= T_max when ``T_max`` is given (T_x is read from it, as in the course)."""
    n_a, m = like.shape
    if T_max is None:
        return _cols(name, d, (n_a, m), like.dtype, ("n_a", "m"))
    _cols(name, d, (n_a, m, None), like.dtype, ("n_a", "m", "T_x"))
    if not 1 <= d.shape[2] <= T_max:
        raise ValueError(f"{name} has shape {tuple(d.shape)}: T_x must be from 1 to the "
                         f"{T_max} steps of the caches")


def _one_chunk(T):
    """The driver's options for the course's caches: every step's gates kept, one chunk."""
    return _driver.Options(residuals="gates", chunk=T)


def _time_major(x):
    """(n, m, T) course columns <-> (T, m, n) core rows; its own inverse."""
    return jnp.transpose(x, (2, 1, 0))


# ----------------------------------------------------------------------------- RNN


def rnn_cell_forward(xt, a_prev, parameters):
    """One RNN step. xt (n_x, m), a_prev (n_a, m); keys Wax, Waa, Wya, ba, by.

    Returns ``(a_next (n_a, m), yt_pred (n_y, m), cache)``, cache =
    ``(a_next, a_prev, xt, parameters)``.
    """
    p = _rnn_params(parameters)
    _inputs(parameters, "Wax", p.Wax.shape[1], xt, {"a_prev": a_prev}, step=True)
    a, y, caches = _rnn_forward(p, xt[:, :, None], a_prev, parameters)
    return a[:, :, 0], y[:, :, 0], caches[0][0]


def rnn_forward(x, a0, parameters):
    """The RNN over x (n_x, m, T_x) from a0 (n_a, m).

    Returns ``(a (n_a, m, T_x), y_pred (n_y, m, T_x), caches)``, caches =
    ``(list of the T_x step caches, x)``.
    """
    p = _rnn_params(parameters)
    _inputs(parameters, "Wax", p.Wax.shape[1], x, {"a0": a0})
    return _rnn_forward(p, x, a0, parameters)


def _rnn_forward(p, x, a0, parameters):
    """`rnn_forward` on inputs its callers have checked."""
    hs, _, _ = _driver.forward(RNN_CELL, p, _time_major(x), a0.T, keep_residuals=False)
    a = _time_major(hs)
    y_pred = softmax(jnp.einsum("yn,nmt->ymt", parameters["Wya"], a)
                     + parameters["by"][:, :, None])
    a_prevs = jnp.concatenate([a0[:, :, None], a[:, :, :-1]], axis=2)
    caches = [(a[:, :, t], a_prevs[:, :, t], x[:, :, t], parameters)
              for t in range(x.shape[2])]
    return a, y_pred, (caches, x)


def rnn_cell_backward(da_next, cache):
    """Backward of one RNN step: da_next (n_a, m) is dL/da_next.

    Returns ``{dxt, da_prev, dWax, dWaa, dba}``.
    """
    a_next, a_prev, xt, parameters = _cache(cache, 4, "cache", "rnn_cell_forward")
    _cotangent("da_next", da_next, a_next)
    g = rnn_backward(da_next[:, :, None], ([cache], xt[:, :, None]))
    return {"dxt": g["dx"][:, :, 0], "da_prev": g["da0"], "dWax": g["dWax"],
            "dWaa": g["dWaa"], "dba": g["dba"]}


def rnn_backward(da, caches):
    """BPTT for the RNN: da (n_a, m, T_x) is dL/da<t> for every t (upstream only).

    The reverse scan adds the gradient carried from step t+1 to da[:, :, t]
    at every step. Returns ``{dx, da0, dWax, dWaa, dba}``.
    """
    steps = _steps(caches, 4, "rnn_forward")
    _cotangent("da", da, steps[0][0], len(steps))
    T = da.shape[2]
    steps = steps[:T]
    p = _rnn_params(steps[0][3])
    a0 = steps[0][1].T
    xs = jnp.stack([c[2].T for c in steps])
    states = jnp.stack([c[0].T for c in steps])
    saved = (_driver.Saved(states=states, res=()),)  # one segment
    dp, dxs, da0 = _driver.backward(RNN_CELL, p, xs, a0, saved, _time_major(da),
                                    jnp.zeros_like(a0), opts=_one_chunk(T))
    return {"dx": _time_major(dxs), "da0": da0.T, "dWax": dp.Wax, "dWaa": dp.Waa,
            "dba": _col(dp.ba)}


# ---------------------------------------------------------------------------- LSTM


def lstm_cell_forward(xt, a_prev, c_prev, parameters):
    """One LSTM step. xt (n_x, m), a_prev and c_prev (n_a, m); keys Wf, bf, Wi, bi,
    Wc, bc, Wo, bo, Wy, by.

    Returns ``(a_next, c_next, yt_pred, cache)``, cache = ``(a_next, c_next,
    a_prev, c_prev, ft, it, cct, ot, xt, parameters)``.
    """
    p = _lstm_params(parameters)
    _inputs(parameters, "Wf", _n_x(p), xt, {"a_prev": a_prev, "c_prev": c_prev}, step=True)
    a, y, c, caches = _lstm_forward(p, xt[:, :, None], a_prev, c_prev, parameters)
    return a[:, :, 0], c[:, :, 0], y[:, :, 0], caches[0][0]


def lstm_forward(x, a0, parameters):
    """The LSTM over x (n_x, m, T_x) from a0 (n_a, m) and c0 = 0.

    Returns ``(a, y, c, caches)``: a and c (n_a, m, T_x), y (n_y, m, T_x), caches =
    ``(list of the T_x step caches, x)``.
    """
    p = _lstm_params(parameters)
    _inputs(parameters, "Wf", _n_x(p), x, {"a0": a0})
    return _lstm_forward(p, x, a0, jnp.zeros_like(a0), parameters)


def _n_x(p):
    return p.Wf.shape[1] - p.Wf.shape[0]


def _lstm_forward(p, x, a0, c0, parameters):
    """The LSTM from (a0, c0), on inputs its callers have checked."""
    xs = _time_major(x)
    state0 = LSTMState(a0.T, c0.T)
    gates = _driver.forward(LSTM_CELL, p, xs, state0, opts=_one_chunk(xs.shape[0]))[2][0].res
    replay = lambda s, G: (LSTM_CELL.replay(s, G),) * 2  # noqa: E731 (states from the gates)
    states = jax.lax.scan(replay, state0, gates)[1]
    a, c = _time_major(states.a), _time_major(states.c)
    ft, it, cct, ot = (_time_major(g) for g in gates)
    y = softmax(jnp.einsum("yn,nmt->ymt", parameters["Wy"], a) + parameters["by"][:, :, None])
    a_prevs = jnp.concatenate([a0[:, :, None], a[:, :, :-1]], axis=2)
    c_prevs = jnp.concatenate([c0[:, :, None], c[:, :, :-1]], axis=2)
    caches = [(a[:, :, t], c[:, :, t], a_prevs[:, :, t], c_prevs[:, :, t], ft[:, :, t],
               it[:, :, t], cct[:, :, t], ot[:, :, t], x[:, :, t], parameters)
              for t in range(x.shape[2])]
    return a, y, c, (caches, x)


def lstm_cell_backward(da_next, dc_next, cache):
    """Backward of one LSTM step: da_next, dc_next (n_a, m) are dL/da_next, dL/dc_next.

    Returns ``{dxt, da_prev, dc_prev, dWf, dbf, dWi, dbi, dWc, dbc, dWo, dbo}``.
    """
    _cache(cache, 10, "cache", "lstm_cell_forward")
    _cotangent("da_next", da_next, cache[0])
    _cotangent("dc_next", dc_next, cache[1])
    g = _lstm_backward(da_next[:, :, None], dc_next, [cache])
    g["dxt"] = g.pop("dx")[:, :, 0]
    g["da_prev"] = g.pop("da0")
    g["dc_prev"] = g.pop("dc0")
    return g


def lstm_backward(da, caches):
    """BPTT for the LSTM: da (n_a, m, T_x) is dL/da<t> for every t (upstream only).

    The reverse scan carries both da_prev (added to da[:, :, t]) and dc_prev from
    step to step; T_x is read from da. Returns ``{dx, da0, dWf, dbf, dWi, dbi, dWc,
    dbc, dWo, dbo}`` (the course's keys; the core also gives dc0).
    """
    steps = _steps(caches, 10, "lstm_forward")
    _cotangent("da", da, steps[0][0], len(steps))
    g = _lstm_backward(da, jnp.zeros_like(da[:, :, 0]), steps[:da.shape[2]])
    del g["dc0"]
    return g


def _lstm_backward(da, dc_T, steps):
    p = _lstm_params(steps[0][9])
    carry0 = LSTMState(steps[0][2].T, steps[0][3].T)
    xs = jnp.stack([s[8].T for s in steps])
    states = LSTMState(jnp.stack([s[0].T for s in steps]), jnp.stack([s[1].T for s in steps]))
    gates = _Gates(*(jnp.stack([s[k].T for s in steps]) for k in (4, 5, 6, 7)))
    saved = (_driver.Saved(states=states, res=gates),)  # one segment
    dp, dxs, d0 = _driver.backward(LSTM_CELL, p, xs, carry0, saved, _time_major(da),
                                   LSTMState(jnp.zeros_like(dc_T.T), dc_T.T),
                                   opts=_one_chunk(len(steps)))
    g = {"dx": _time_major(dxs), "da0": d0.a.T, "dc0": d0.c.T}
    for gate in _LSTM_GATES:
        g["dW" + gate] = getattr(dp, "W" + gate)
        g["db" + gate] = _col(getattr(dp, "b" + gate))
    return g
