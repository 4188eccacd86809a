"""Every residual policy and chunk size gives the same gradients; the default saves memory."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbptt as jb
from jaxbptt import _driver
from jaxbptt.gradflow import zeros_probe
from cells import CELLS, cotangents, make, rel_err, vjp

LSTM_CELL = importlib.import_module("jaxbptt.lstm").LSTM_CELL


@pytest.mark.parametrize("chunk", [None, 3] + [pytest.param(k, marks=pytest.mark.slow)
                                               for k in (1, 11)])
@pytest.mark.parametrize("residuals", jb.RESIDUAL_POLICIES)
@pytest.mark.parametrize("cell", CELLS)
def test_policies_equal_autodiff(cell, residuals, chunk):
    fn, params, xs, state0 = make(cell, 11, 3, 2, 4)
    cts = cotangents(fn, params, xs, state0)
    ref = vjp(fn, (params, xs, state0), cts, backward="autodiff")
    got = vjp(fn, (params, xs, state0), cts, residuals=residuals, chunk=chunk)
    assert rel_err(got, ref) < 1e-12


@pytest.mark.parametrize("residuals", jb.RESIDUAL_POLICIES)
@pytest.mark.parametrize("cell", CELLS)
def test_policies_with_lengths_reverse_truncate_probe(cell, residuals):
    T = 10
    fn, params, xs, state0 = make(cell, T, 4, 2, 3)
    probe = zeros_probe(state0, T)
    xs = xs.at[7:, 1].set(jnp.inf)  # padding of row 1 holds garbage
    kw = dict(lengths=jnp.asarray([10, 7, 0, 3]), reverse=True, truncate=3)
    cts = cotangents(fn, params, xs, state0)

    def f(params, xs, state0, probe, **extra):
        return fn(params, xs, state0, probe=probe, **kw, **extra)

    ref = vjp(f, (params, xs, state0, probe), cts, backward="autodiff")
    got = vjp(f, (params, xs, state0, probe), cts, residuals=residuals, chunk=4)
    assert rel_err(got, ref) < 1e-12
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(got))


@pytest.mark.parametrize("options", [
    pytest.param(dict(chunk=(6, 3)), marks=pytest.mark.slow), dict(chunk=(8, 4, 2)),
    dict(chunk=1, slots=1), pytest.param(dict(chunk=1, slots=4), marks=pytest.mark.slow),
    dict(chunk=3, slots=3)], ids=str)
@pytest.mark.parametrize("cell", CELLS)
def test_reruns_equal_autodiff(cell, options):
    # T = 23 pads the (outer) chunks; lengths, reverse, truncation and the probe all act
    # in every rerun: at every level of a nest (Chen et al.), and in a slots schedule's
    # reruns from one kept start to the next chunk (Gruslys et al.).
    T = 23
    fn, params, xs, state0 = make(cell, T, 4, 2, 3)
    probe = zeros_probe(state0, T)
    xs = xs.at[13:, 1].set(jnp.inf)
    cts = cotangents(fn, params, xs, state0)
    for kw in (dict(), dict(lengths=jnp.asarray([23, 13, 0, 5]), reverse=True, truncate=4)):
        def f(params, xs, state0, probe, kw=kw, **extra):
            return fn(params, xs, state0, probe=probe, **kw, **extra)
        args = (params, xs if kw else jnp.nan_to_num(xs), state0, probe)
        ref = vjp(f, args, cts, backward="autodiff")
        got = vjp(f, args, cts, residuals="checkpoint", **options)
        assert rel_err(got, ref) < 1e-12, kw


def test_bad_nested_chunks():
    fn, params, xs, state0 = make("gru-course", 10, 2, 3, 4)
    with pytest.raises(ValueError, match=r"a tuple chunk= \(nested chunk sizes\) needs "
                                         r"residuals='checkpoint'"):
        fn(params, xs, state0, chunk=(4, 2))
    with pytest.raises(ValueError, match="nested chunk sizes must each divide the one before"):
        fn(params, xs, state0, residuals="checkpoint", chunk=(6, 4))


@pytest.mark.parametrize("T,chunk", [(10, (12, 4)), (7, (8, 4, 2)), (1, (6, 3))])
def test_nested_outer_chunk_longer_than_T(T, chunk):
    # The outer chunk becomes the multiple of the next size that holds T (T padded).
    fn, params, xs, state0 = make("lstm", T, 2, 3, 4)
    cts = cotangents(fn, params, xs, state0)

    def f(params, xs, state0, **kw):
        return fn(params, xs, state0, lengths=jnp.asarray([T, T // 2]), **kw)
    ref = vjp(f, (params, xs, state0), cts, backward="autodiff")
    got = vjp(f, (params, xs, state0), cts, residuals="checkpoint", chunk=chunk)
    assert rel_err(got, ref) < 1e-12


def test_unknown_policy_and_bad_chunk():
    fn, params, xs, state0 = make("lstm", 5, 2, 3, 4)
    with pytest.raises(ValueError, match="residuals must be one of"):
        fn(params, xs, state0, residuals="all")
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        fn(params, xs, state0, chunk=0)


def test_rnn_default_chunk_keeps_a_block_within_4_mib():
    # The RNN's chunks keep no gates: as many steps as keep a (K, B, n_a) block within
    # 4 MiB, from 32 to 128, then moved to a divisor of T near it.
    rnn = importlib.import_module("jaxbptt.rnn").RNN_CELL
    assert rnn.chunk(32, 128, np.float32) == 128  # 16 KiB a step
    assert rnn.chunk(32, 256, np.float64) == 64  # 64 KiB a step
    assert rnn.chunk(64, 512, np.float32) == 32  # 128 KiB a step
    assert rnn.chunk(256, 1024, np.float32) == 32  # never fewer steps
    for T, K in ((100, 100), (200, 100), (1024, 128), (7, 7)):
        opts = _driver.Options(default_chunk=_driver.default_chunk(rnn, 32, 128, np.float32))
        assert _driver.chunk_size(T, opts) == K, T
    opts = _driver.Options(default_chunk=_driver.default_chunk(LSTM_CELL, 32, 128, np.float32))
    assert _driver.chunk_size(100, opts) == 10  # the LSTM's 8, moved to a divisor


def _temp_bytes(fn, params, xs, **kw):
    loss = lambda p, x: jnp.sum(fn(p, x, **kw)[0])  # noqa: E731
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, xs).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("cell", CELLS)
def test_default_policy_keeps_less_than_autodiff(cell):
    # A property of the compiled programs (XLA's buffer assignment), not a timing.
    fn, params, xs, _ = make(cell, 128, 16, 32, 64, dtype=np.float32)
    manual = _temp_bytes(fn, params, xs)
    auto = _temp_bytes(fn, params, xs, backward="autodiff")
    assert manual < auto, (manual, auto)


def test_checkpoint_memory_grows_sublinearly():
    fn, params, _, _ = make("lstm", 1, 8, 16, 32, dtype=np.float32)
    mem = {}
    for T in (256, 1024):
        xs = jnp.zeros((T, 8, 16), jnp.float32)

        def loss(p, x):  # a loss on the final state: no (T, B, n_a) output cotangent to keep
            return jnp.sum(fn(p, x, residuals="checkpoint")[1].a)
        mem[T] = jax.jit(jax.grad(loss)).lower(params, xs).compile().memory_analysis()
        mem[T] = mem[T].temp_size_in_bytes
    assert mem[1024] < 3.0 * mem[256], mem  # linear growth would be 4x


@pytest.mark.parametrize("options", [
    dict(residuals="gates", chunk=8), dict(residuals="checkpoint", chunk=32),
    dict(residuals="checkpoint", chunk=8, slots=8)], ids=str)
def test_short_last_chunk_costs_no_copy(options):
    # When K does not divide T, the steps left run as one shorter chunk of their own,
    # reading and writing in place: T = 1027 keeps at most 3 steps' residuals more than
    # T = 1024 (gates: 4 n_a B 4 = 4 KiB per step), no padded copies of T steps of the
    # inputs, their gradients or the outputs' cotangents (B (2 n_x + n_a) 4 = 1.5 KiB per
    # step: 1.5 MiB). A property of the compiled programs.
    fn, params, _, _ = make("lstm", 1, 8, 8, 32, dtype=np.float32)
    temp = {T: _temp_bytes(fn, params, jnp.zeros((T, 8, 8), jnp.float32), **options)
            for T in (1024, 1027)}
    assert temp[1027] - temp[1024] <= 3 * 4 * 32 * 8 * 4, temp
