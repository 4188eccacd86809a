"""Calls outside jit: compiled once per shapes and options, with the values jit gives."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbptt as jb
from cells import CELLS, make, rel_err, sweep
from jaxbptt import _driver


@pytest.mark.parametrize("cell", CELLS)
def test_eager_calls_compile_once_and_match_jit(cell):
    # The loops' bodies are new closures at every call: run eagerly through lax.scan they
    # were traced and compiled anew each time (about 0.5 s per call of the README's stream).
    fn, params, xs, state0 = make(cell, 7, 3, 2, 4)
    first = fn(params, xs, state0, reverse=True)  # compiles (once per cell and options)
    compiled = _driver._run_compiled._cache_size()
    for scale in (2.0, -1.0, 0.5):
        got = fn(params, scale * xs, state0, reverse=True)
        with jax.disable_jit():  # op by op: the eager call itself runs compiled
            want = fn(params, scale * xs, state0, reverse=True)
        assert rel_err(got, want) < 1e-12
    assert _driver._run_compiled._cache_size() == compiled
    assert rel_err(first, fn(params, xs, state0, reverse=True)) == 0


def test_lengths_as_a_list_compile_once(caplog):
    # A list is taken as the array it holds: not a new trace and compilation at every call
    # (0.3 s per LSTM forward at (50, 8, 16, 32), and 0.45 s per gradient, before).
    fn, params, xs, state0 = make("lstm", 7, 3, 2, 4)
    want = fn(params, xs, state0, lengths=np.array([7, 3, 0]))
    assert rel_err(fn(params, xs, state0, lengths=[7, 3, 0]), want) == 0  # compiles
    caplog.clear()
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        for lengths in ([7, 3, 0], (7, 3, 0), [6, 2, 1]):
            got = fn(params, xs, state0, lengths=lengths)
    assert not [r.message for r in caplog.records if "ompil" in r.message]
    assert rel_err(got, fn(params, xs, state0, lengths=np.array([6, 2, 1]))) == 0


OPTIONS = {"default": {},
           "lengths, reverse, truncate": dict(lengths=np.array([9, 4, 0]), reverse=True, truncate=3),
           "checkpoint, slots": dict(residuals="checkpoint", chunk=2, slots=2)}


@pytest.mark.parametrize("cell,options", sweep(OPTIONS))
def test_eager_grad_compiles_once_and_matches_jit(cell, options, caplog):
    # jax.grad outside jit runs the custom_vjp's backward rule eagerly, after the forward.
    # Its loops' bodies are new closures at every call: it was traced and compiled anew each
    # time (1.26 s per gradient at (100, 32, 64, 128), against 39 ms through jit).
    fn, params, xs, state0 = make(cell, 9, 3, 2, 4)
    loss = lambda p, x, s: jnp.sum(jnp.sin(fn(p, x, s, **OPTIONS[options])[0]))  # noqa: E731
    grad = jax.grad(loss, argnums=(0, 1, 2))
    scales = (1.0, 2.0, -0.5)
    want = [jax.jit(grad)(params, c * xs, state0) for c in scales]
    got = [grad(params, xs, state0)]  # compiles (once per cell, shapes and options)
    caplog.clear()
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        got += [grad(params, c * xs, state0) for c in scales[1:]]
    assert not [r.message for r in caplog.records if "ompil" in r.message]
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-12


def test_eager_stream_reuses_one_program():
    # The README's streaming loop: after the first window (state None) and the second
    # (a state), every window runs the same compiled program.
    params = jb.init_rnn(jax.random.PRNGKey(0), 3, 4, jnp.float64)
    stream = jax.random.normal(jax.random.PRNGKey(1), (60, 2, 3))
    state = None
    for i, x in enumerate(jb.split_stream(stream, 10)):
        hs, state = jb.rnn(params, x, jb.detach(state))
        if i == 1:
            compiled = _driver._run_compiled._cache_size()
    assert _driver._run_compiled._cache_size() == compiled
    whole, _ = jax.jit(lambda p, x: jb.rnn(p, x))(params, stream)
    assert rel_err(hs, whole[-10:]) < 1e-12


def test_eager_errors_are_the_same():
    params = jb.init_lstm(jax.random.PRNGKey(0), 3, 4, jnp.float64)
    xs = np.zeros((5, 2, 6))
    with pytest.raises(ValueError, match=r"xs has shape \(5, 2, 6\) but the params expect n_x=3"):
        jb.lstm(params, xs)
    with pytest.raises(TypeError, match="state0 must be an LSTMState"):
        jb.lstm(params, xs[..., :3], (np.zeros((2, 4)), np.zeros((2, 4))))


def test_numpy_float64_with_jax_s_default_float32_runs_as_under_jit():
    # With x64 off, JAX takes a NumPy float64 xs as float32: an eager call does as jit does.
    xs = np.random.default_rng(0).normal(size=(6, 2, 3))
    with jax.enable_x64(False):
        params = jb.init_lstm(jax.random.PRNGKey(0), 3, 4)
        hs, _ = jb.lstm(params, xs)
        want, _ = jax.jit(jb.lstm)(params, xs)
    assert hs.dtype == want.dtype == jnp.float32
    assert rel_err(hs, want) == 0
    # the params too, and cross_entropy's weights: NumPy float64 all, float32 in JAX
    with jax.enable_x64(False):
        f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
        params = jax.tree.map(f64, jb.init_rnn(jax.random.PRNGKey(0), 3, 4))
        out = jax.tree.map(f64, jb.init_output(jax.random.PRNGKey(1), 4, 5))
        hs, _ = jb.rnn(params, xs)
        want, _ = jax.jit(jb.rnn)(params, xs)
        labels, weights = np.zeros((6, 2), np.int64), np.ones((6, 2))
        loss = jb.cross_entropy(out, hs, labels, weights)
        loss_jit = jax.jit(jb.cross_entropy)(out, hs, labels, weights)
    assert params.Wax.dtype == np.float64 and hs.dtype == want.dtype == jnp.float32
    assert rel_err(hs, want) == 0 and rel_err(loss, loss_jit) < 1e-6
