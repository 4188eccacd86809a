"""jb.stack wiring, dropout, errors; detach/split_stream equal truncated BPTT."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbptt as jb
from jaxbptt import _driver
from cells import CELLS, FN, cotangents, make, params, rel_err


def _layers(cell, n_x, n_a, L, bidirectional, seed=0):
    layers, n_in = [], n_x
    for l in range(L):
        fwd = params(cell, n_in, n_a, seed=seed + 2 * l)
        layers.append(jb.Bidirectional(fwd, params(cell, n_in, n_a, seed=seed + 2 * l + 1))
                      if bidirectional else fwd)
        n_in = n_a * (2 if bidirectional else 1)
    return tuple(layers)


def _manual_stack(cell, layers, xs, init, lengths):
    """Layer by layer with the single-layer functions, written out."""
    fn, D = FN[cell], 2 if isinstance(layers[0], jb.Bidirectional) else 1
    finals = []
    for l, layer in enumerate(layers):
        outs = []
        for d, p in enumerate(layer if D == 2 else (layer,)):
            s0 = jax.tree.map(lambda s: s[l * D + d], init)
            hs, fin = fn(p, xs, s0, lengths=lengths, reverse=d == 1, backward="autodiff")
            outs.append(hs)
            finals.append(fin)
        xs = jnp.concatenate(outs, -1)
    return xs, jax.tree.map(lambda *f: jnp.stack(f), *finals)


@pytest.mark.parametrize("cell,bidirectional", [
    ("rnn", False), ("lstm", False), ("lstm", True), ("gru-course", True), ("gru-cudnn", False),
    pytest.param("rnn", True, marks=pytest.mark.slow),
    pytest.param("gru-cudnn", True, marks=pytest.mark.slow),
    pytest.param("gru-course", False, marks=pytest.mark.slow)])
def test_stack_gradients_bptt_equal_autodiff(cell, bidirectional):
    T, B, n_x, n_a, L = 5, 3, 2, 4, 2
    layers = _layers(cell, n_x, n_a, L, bidirectional)
    _, _, xs, _ = make(cell, T, B, n_x, n_a)
    D = 2 if bidirectional else 1
    rng = np.random.default_rng(3)
    h0 = jnp.asarray(rng.normal(size=(L * D, B, n_a)))
    init = jb.LSTMState(h0, jnp.asarray(rng.normal(size=(L * D, B, n_a)))) if cell == "lstm" else h0
    lengths = jnp.asarray([5, 1, 3])
    ys, fins = jb.stack(layers, xs, init, lengths=lengths)
    assert ys.shape == (T, B, D * n_a)
    w, v = (jnp.asarray(rng.normal(size=ys.shape)),
            jax.tree.map(lambda f: jnp.asarray(rng.normal(size=f.shape)), fins))

    def loss(run):
        def f(layers, xs, init):
            ys, fins = run(layers, xs, init)
            return jnp.sum(ys * w) + sum(jnp.sum(a * b) for a, b in
                                          zip(jax.tree.leaves(fins), jax.tree.leaves(v)))
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(layers, xs, init)

    ref = loss(lambda *a: _manual_stack(cell, *a, lengths))
    # every layer's residual options pass through: 5 chunks of a step, 2 slots, reruns
    assert _driver._schedule(_driver._Layout(T, 1, T, None), _driver.Options(slots=2)) is not None
    for kw in (dict(backward="bptt"), dict(backward="autodiff"),
               dict(residuals="checkpoint", chunk=1, slots=2)):
        got = loss(lambda *a, kw=kw: jb.stack(*a, lengths=lengths, **kw))
        assert rel_err(got, ref) < 1e-12, kw


def test_dropout_is_inverted_and_keyed():
    layers = _layers("gru-cudnn", 3, 4, 3, False)
    xs = make("gru-cudnn", 6, 5, 3, 4)[2]
    key = jax.random.PRNGKey(0)
    base, _ = jb.stack(layers, xs)
    a, _ = jb.stack(layers, xs, dropout=0.5, key=key)
    b, _ = jb.stack(layers, xs, dropout=0.5, key=key)
    c, _ = jb.stack(layers, xs, dropout=0.5, key=jax.random.PRNGKey(1))
    assert rel_err(a, b) == 0.0 and rel_err(a, base) > 1e-3 and rel_err(a, c) > 1e-3
    one = jb.stack(layers[:1], xs, dropout=0.5, key=key)[0]  # no dropout after the last layer
    assert rel_err(one, jb.stack(layers[:1], xs)[0]) == 0.0
    # Inverted dropout on the input of every layer but the first, each layer with its own
    # mask (key l of split(key, L)): kept with probability 1 - p and scaled by 1 / (1 - p),
    # so the mean input of each is preserved. (At p = 0.5, 1 - p = p: a rate of 0.2 tells
    # the two apart.)
    keys = jax.random.split(key, 3)
    h = jb.gru(layers[0], xs)[0]
    for l in (1, 2):
        keep = jax.random.bernoulli(keys[l], 0.8, h.shape)
        h = jb.gru(layers[l], jnp.where(keep, h / 0.8, 0.0))[0]
        assert rel_err(jb.stack(layers[:l + 1], xs, dropout=0.2, key=key)[0], h) < 1e-15, l


def test_stack_errors():
    lstm = params("lstm", 3, 4)
    rnn = params("rnn", 3, 4)
    xs = make("lstm", 5, 2, 3, 4)[2]
    with pytest.raises(TypeError, match="one cell type"):
        jb.stack((lstm, rnn), xs)
    with pytest.raises(TypeError, match=r"got LSTMParams \(one layer: pass \(LSTMParams"):
        jb.stack(lstm, xs)
    with pytest.raises(ValueError, match="every layer of a stack is Bidirectional or none"):
        jb.stack((jb.Bidirectional(lstm, lstm), params("lstm", 8, 4)), xs)
    with pytest.raises(ValueError, match=r"same hidden size n_a .*\[4, 5\]"):
        jb.stack((lstm, params("lstm", 4, 5)), xs)
    # each layer's params are checked whole first: a bias of the wrong size is named as such
    with pytest.raises(ValueError, match=r"^layer 1: LSTMParams.bi has shape \(5,\), expected "
                                         r"\(4,\)"):
        jb.stack((lstm, lstm._replace(bi=jnp.zeros(5))), xs)
    with pytest.raises(TypeError, match=r"^layer 0 \(backward direction\): RNNParams.Waa must "
                                        r"be an array, got NoneType"):
        jb.stack((jb.Bidirectional(rnn, rnn._replace(Waa=None)),), xs)
    with pytest.raises(ValueError, match=r"init has shape \(1, 2, 4\), expected .* \(2, 2, 4\)"):
        jb.stack((lstm, params("lstm", 4, 4)), xs, jb.LSTMState(*(jnp.zeros((1, 2, 4)),) * 2))
    with pytest.raises(TypeError, match="init must be an array, got list"):
        jb.stack((rnn,), xs, [[0.0]])
    with pytest.raises(ValueError, match="needs a PRNG key"):
        jb.stack((lstm,), xs, dropout=0.2)
    with pytest.raises(TypeError, match="key must be one PRNG key, .*got int 0"):
        jb.stack((lstm,), xs, dropout=0.2, key=0)
    with pytest.raises(TypeError, match=r"xs must be an array, got list"):
        jb.stack((lstm,), xs.tolist())
    with pytest.raises(TypeError,
                       match=r"dropout must be a Python float .*got an array float64\(\)"):
        jax.jit(lambda p: jb.stack((lstm,), xs, dropout=p, key=jax.random.PRNGKey(0)))(0.2)
    # a layer's input size is checked by the cell; the message names the layer and its xs
    with pytest.raises(ValueError, match=r"^layer 1: .*n_x=3.*its xs is layer 0's output "
                                         r"\(5, 2, 4\) = \(T, B, D \* n_a\)"):
        jb.stack((lstm, params("lstm", 3, 4)), xs)
    with pytest.raises(ValueError, match=r"^layer 1 \(backward direction\): .*n_x=3.*"
                                         r"layer 0's output \(5, 2, 8\)"):
        jb.stack((jb.Bidirectional(params("lstm", 3, 4), params("lstm", 3, 4)),
                  jb.Bidirectional(params("lstm", 8, 4), params("lstm", 3, 4))), xs)
    with pytest.raises(TypeError, match=r"^layer 0: .*float32.*initial state is init\[0\]"):
        jb.stack((lstm, params("lstm", 4, 4)), xs,
                 jb.LSTMState(*(jnp.zeros((2, 2, 4), jnp.float32),) * 2))
    with pytest.raises(ValueError, match="slots= needs residuals='checkpoint'"):  # passed on
        jb.stack((lstm,), xs, slots=2)


@pytest.mark.parametrize("cell", CELLS)
def test_streamed_chunks_equal_truncate(cell):
    # Summed gradients of chunk-by-chunk training with the state carried and
    # detached (JAX's derivative) equal one truncated-BPTT call with truncate = chunk.
    fn, p, xs, state0 = make(cell, 12, 2, 3, 4)
    w = cotangents(fn, p, xs, state0)[0]
    k = 4

    def chunked(p, state0):
        total, state = 0.0, state0
        for i, (x, wc) in enumerate(zip(*jb.split_stream((xs, w), k))):
            hs, state = fn(p, x, state if i == 0 else jb.detach(state), backward="autodiff")
            total = total + jnp.sum(hs * wc)
        return total

    def truncated(p, state0):
        return jnp.sum(fn(p, xs, state0, truncate=k)[0] * w)

    g_chunk = jax.jit(jax.grad(chunked, argnums=(0, 1)))(p, state0)
    g_trunc = jax.jit(jax.grad(truncated, argnums=(0, 1)))(p, state0)
    assert rel_err(g_chunk, g_trunc) < 1e-12


def test_split_stream():
    x = jnp.arange(10 * 2).reshape(10, 2)
    windows = jb.split_stream(x, 3)
    assert windows.shape == (3, 3, 2) and bool(jnp.all(windows.reshape(9, 2) == x[:9]))
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="positive int"):
            jb.split_stream(x, bad)
    assert jb.split_stream(x, np.int64(3)).shape == (3, 3, 2)
    with pytest.raises(ValueError, match="no window of 11"):
        jb.split_stream(x, 11)
    # a tree of streams is cut alike: one length T for all, or an error
    xs, ys = jb.split_stream((x, x[:, 0]), 5)
    assert xs.shape == (2, 5, 2) and ys.shape == (2, 5)
    with pytest.raises(ValueError, match=r"one length T \(axis 0\), got \[10, 15\]"):
        jb.split_stream((x, jnp.zeros(15)), 5)
    with pytest.raises(ValueError, match="time-major .*got a scalar"):
        jb.split_stream(jnp.float32(1.0), 1)
    with pytest.raises(TypeError, match=r"a stream \(T, ...\) must be an array, got float"):
        jb.split_stream([1.0, 2.0], 1)
    with pytest.raises(ValueError, match="no stream"):
        jb.split_stream({}, 1)
