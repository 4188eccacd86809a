"""Ragged lengths, reverse, truncated BPTT and batch-major input, by hand and by autodiff.

References are built independently of the masking code: each row run alone on
its own valid slice (reversed by hand for ``reverse``), and truncated BPTT as an
explicit Python loop over chunks with ``lax.stop_gradient`` between them.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cells import CELLS, cells, cotangents, make, rel_err, vjp

TOL = {np.float64: 1e-12, np.float32: 3e-5}
LENGTHS = {  # T = 6, B = 4
    "ragged": [6, 3, 1, 4],
    "all_equal": [6, 6, 6, 6],
    "with_zero": [0, 6, 2, 5],
}


def _row(state, b):
    return jax.tree.map(lambda x: x[b:b + 1], state)


def _reference(fn, params, xs, state0, lengths, reverse, backward):
    """Row by row, each on its own valid slice; outputs padded with zeros."""
    T = xs.shape[0]
    hs_rows, finals = [], []
    for b, n in enumerate(lengths):
        s0 = _row(state0, b)
        if n == 0:
            hs_rows.append(jnp.zeros((T, 1, jax.tree.leaves(s0)[0].shape[1]), xs.dtype))
            finals.append(s0)
            continue
        x = xs[:n, b:b + 1]
        hs, fin = fn(params, x[::-1] if reverse else x, s0, backward=backward)
        hs = hs[::-1] if reverse else hs
        hs_rows.append(jnp.concatenate([hs, jnp.zeros((T - n,) + hs.shape[1:], hs.dtype)]))
        finals.append(fin)
    return (jnp.concatenate(hs_rows, axis=1),
            jax.tree.map(lambda *r: jnp.concatenate(r), *finals))


@pytest.mark.parametrize("cell,case,reverse", [
    (cell, case, reverse) if (case == "ragged" or cell in ("lstm", "gru-cudnn")) and (
        (case, reverse) not in (("all_equal", True), ("with_zero", False)))
    else pytest.param(cell, case, reverse, marks=pytest.mark.slow)
    for cell in CELLS for case, reverse in (("ragged", False), ("ragged", True),
                                            ("all_equal", False), ("with_zero", True),
                                            ("all_equal", True), ("with_zero", False))])
def test_lengths_match_rows_run_alone(cell, case, reverse):
    fn, params, xs, state0 = make(cell, 6, 4, 3, 5)
    lengths = LENGTHS[case]
    cts = cotangents(fn, params, xs, state0)
    ref_out, ref_grads = vjp(
        lambda p, x, s: _reference(fn, p, x, s, lengths, reverse, "autodiff"),
        (params, xs, state0), cts)
    for backward in ("bptt", "autodiff"):
        f = lambda p, x, s: fn(p, x, s, lengths=jnp.asarray(lengths), reverse=reverse, backward=backward)  # noqa: E731
        out, grads = vjp(f, (params, xs, state0), cts)
        assert rel_err(out, ref_out) < TOL[np.float64], backward
        assert rel_err(grads, ref_grads) < TOL[np.float64], backward


@pytest.mark.parametrize("cell", cells(slow=("rnn", "gru-course", "gru-cudnn")))
def test_lengths_past_T_mean_T(cell):
    # With chunks that do not divide T (chunk=5 at T=13; T=37 at the default of the LSTM
    # and GRU), the last chunk is shorter: a length past T must clip to T there too.
    for T, chunk in ((13, 5), (37, None)):
        fn, params, xs, state0 = make(cell, T, 4, 2, 3)
        cts = cotangents(fn, params, xs, state0)
        past, clipped = jnp.asarray([T + 1, T + 9, T, -2]), jnp.asarray([T, T, T, 0])
        for kw in (dict(), dict(reverse=True, truncate=3)):
            runs = {}
            for backward in ("bptt", "autodiff"):
                @jax.jit  # one compile serves both lengths
                def run(lengths, kw=kw, backward=backward):
                    f = functools.partial(fn, lengths=lengths, chunk=chunk, backward=backward, **kw)
                    out, pull = jax.vjp(f, params, xs, state0)
                    return out, pull(cts)
                runs[backward] = run
            ref = runs["autodiff"](clipped)  # JAX's derivative, the lengths clipped to [0, T]
            for backward, run in runs.items():
                assert rel_err(run(past), ref) < TOL[np.float64], (T, kw, backward)


def test_lengths_of_any_integer_type():
    # int8 cannot hold T = 130 (clipping to it overflowed); int64 meets int32 times.
    fn, params, xs, state0 = make("lstm", 130, 3, 2, 3)
    ref = fn(params, xs, state0, lengths=jnp.asarray([127, 5, 0], jnp.int32), reverse=True,
             truncate=4)
    for dtype in (np.int8, np.uint8, np.int16, np.int64, np.uint32):
        got = fn(params, xs, state0, lengths=jnp.asarray([127, 5, 0], dtype), reverse=True,
                 truncate=4)
        assert rel_err(got, ref) == 0.0, dtype


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell", CELLS)
def test_garbage_padding_never_leaks(cell, reverse):
    fn, params, xs, state0 = make(cell, 5, 4, 3, 4)
    lengths = jnp.asarray([5, 2, 0, 1])
    valid = (jnp.arange(5)[:, None] < lengths[None])[..., None]
    clean = jnp.where(valid, xs, 0.0)
    dirty = jnp.where(valid, xs, jnp.asarray([jnp.inf, -jnp.inf, jnp.nan])[None, None, :])
    cts = cotangents(fn, params, xs, state0)
    results = {}
    for backward in ("bptt", "autodiff"):
        def f(p, x, s):
            return fn(p, x, s, lengths=lengths, reverse=reverse, backward=backward)

        for name, x in (("clean", clean), ("dirty", dirty)):
            out, grads = vjp(f, (params, x, state0), cts)
            for leaf in jax.tree.leaves((out, grads)):
                assert bool(jnp.all(jnp.isfinite(leaf))), (backward, name)
            results[backward, name] = (out, grads)
        assert rel_err(results[backward, "dirty"], results[backward, "clean"]) == 0.0
        dxs = results[backward, "dirty"][1][1]
        assert float(jnp.max(jnp.abs(jnp.where(valid, 0.0, dxs)))) == 0.0  # no grad to padding
    assert rel_err(results["bptt", "dirty"], results["autodiff", "dirty"]) < TOL[np.float64]


@pytest.mark.parametrize("cell", CELLS)
def test_length_one_and_T_one(cell):
    fn, params, xs, state0 = make(cell, 1, 3, 2, 4)
    lengths = jnp.asarray([1, 0, 1])
    cts = cotangents(fn, params, xs, state0)
    got = {b: vjp(lambda p, x, s: fn(p, x, s, lengths=lengths, backward=b),
                   (params, xs, state0), cts) for b in ("bptt", "autodiff")}
    ref = vjp(lambda p, x, s: _reference(fn, p, x, s, [1, 0, 1], False, "autodiff"),
               (params, xs, state0), cts)
    assert rel_err(got["bptt"], ref) < 1e-12 and rel_err(got["autodiff"], ref) < 1e-12


@pytest.mark.parametrize("cell", CELLS)
def test_float32_lengths_reverse(cell):
    fn, params, xs, state0 = make(cell, 7, 3, 2, 4, dtype=np.float32)
    lengths = jnp.asarray([7, 4, 2])
    cts = cotangents(fn, params, xs, state0)
    got = {b: vjp(lambda p, x, s: fn(p, x, s, lengths=lengths, reverse=True, backward=b),
                   (params, xs, state0), cts) for b in ("bptt", "autodiff")}
    assert rel_err(got["bptt"], got["autodiff"]) < TOL[np.float32]


def _truncated_reference(fn, params, xs, state0, k, reverse):
    """Chunks of k steps (from the sequence's first processed step), state cut between."""
    T = xs.shape[0]
    order = xs[::-1] if reverse else xs
    hs, state = [], state0
    for start in range(0, T, k):
        if start > 0:
            state = jax.lax.stop_gradient(state)
        h, state = fn(params, order[start:start + k], state, backward="autodiff")
        hs.append(h)
    hs = jnp.concatenate(hs)
    return (hs[::-1] if reverse else hs), state


@pytest.mark.parametrize("k", [3, pytest.param(1, marks=pytest.mark.slow),
                               pytest.param(10, marks=pytest.mark.slow)])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell", CELLS)
def test_truncate_matches_stop_gradient_chunks(cell, reverse, k):
    fn, params, xs, state0 = make(cell, 7, 3, 2, 4)
    cts = cotangents(fn, params, xs, state0)
    ref = vjp(lambda p, x, s: _truncated_reference(fn, p, x, s, k, reverse),
               (params, xs, state0), cts)
    for backward in ("bptt", "autodiff"):
        got = vjp(lambda p, x, s: fn(p, x, s, truncate=k, reverse=reverse, backward=backward),
                   (params, xs, state0), cts)
        assert rel_err(got, ref) < TOL[np.float64], backward


@pytest.mark.parametrize("cell", cells(slow=("rnn", "gru-course", "gru-cudnn")))
def test_truncate_with_lengths(cell):
    # Each row is cut every k steps of its own sequence, whatever its length.
    fn, params, xs, state0 = make(cell, 7, 3, 2, 4)
    lengths = [7, 5, 2]
    cts = cotangents(fn, params, xs, state0)
    for reverse in (False, True):
        def reference(p, x, s):
            rows = [_truncated_reference(fn, p, x[:n, b:b + 1], _row(s, b), 2, reverse)
                    for b, n in enumerate(lengths)]
            hs = jnp.concatenate([jnp.concatenate([h, jnp.zeros((7 - h.shape[0],) + h.shape[1:])])
                                  for h, _ in rows], axis=1)
            return hs, jax.tree.map(lambda *r: jnp.concatenate(r), *[f for _, f in rows])

        ref = vjp(reference, (params, xs, state0), cts)
        for backward in ("bptt", "autodiff"):
            got = vjp(lambda p, x, s: fn(p, x, s, truncate=2, reverse=reverse, backward=backward,
                                          lengths=jnp.asarray(lengths)), (params, xs, state0), cts)
            assert rel_err(got, ref) < TOL[np.float64], (reverse, backward)


@pytest.mark.parametrize("cell", CELLS)
def test_batch_major(cell):
    fn, params, xs, state0 = make(cell, 5, 3, 2, 4)
    hs_t, fin_t = fn(params, xs, state0)
    hs_b, fin_b = fn(params, jnp.swapaxes(xs, 0, 1), state0, time_major=False)
    assert hs_b.shape == (3, 5, 4)
    assert rel_err((jnp.swapaxes(hs_b, 0, 1), fin_b), (hs_t, fin_t)) == 0.0


def test_option_errors():
    fn, params, xs, state0 = make("lstm", 5, 3, 2, 4)
    with pytest.raises(ValueError, match=r"lengths has shape \(2,\), expected \(B,\) = \(3,\)"):
        fn(params, xs, state0, lengths=jnp.asarray([1, 2]))
    with pytest.raises(TypeError, match="lengths must be integers, got float"):
        fn(params, xs, state0, lengths=jnp.asarray([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="truncate must be a positive int"):
        fn(params, xs, state0, truncate=0)
    with pytest.raises(ValueError, match=r"\(B, T, n_x\) when time_major=False"):
        fn(params, xs[0], state0, time_major=False)
    with pytest.raises(TypeError, match="reverse must be a bool, got 'no'"):
        fn(params, xs, state0, reverse="no")
    with pytest.raises(TypeError, match="time_major must be a bool, got 0"):
        fn(params, xs, state0, time_major=0)
    with pytest.raises(TypeError, match=r"reverse must be a Python bool, static under jit.*"
                                        r"static_argnames=\('reverse',\)"):
        jax.jit(fn)(params, xs, state0, reverse=True)
    assert fn(params, xs, state0, reverse=np.bool_(True))[0].shape == (5, 3, 4)
    with pytest.raises(ValueError, match=r"chunk=\(\) holds no chunk size"):
        fn(params, xs, state0, residuals="checkpoint", chunk=())
    with pytest.raises(ValueError, match=r"a tuple, got the list \[4, 2\]: chunk=\(4, 2\)"):
        fn(params, xs, state0, residuals="checkpoint", chunk=[4, 2])
