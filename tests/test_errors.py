"""Bad input raises a clear ValueError/TypeError naming the shapes, also under jit."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbptt as jb
from cells import CELLS, make


def _raises(exc, pieces, fn, *args, **kwargs):
    """fn raises exc, eagerly and under jit, with every piece in the message."""
    for f in (fn, jax.jit(fn, static_argnames=tuple(kwargs))):
        with pytest.raises(exc) as info:
            f(*args, **kwargs)
        for piece in pieces:
            assert piece in str(info.value), (piece, str(info.value))


@pytest.mark.parametrize("cell", CELLS)
def test_xs_rank(cell):
    fn, params, xs, state0 = make(cell, 4, 2, 3, 5)
    _raises(ValueError, ["rank 3", "(4, 3)"], fn, params, xs[:, 0], state0)
    _raises(ValueError, ["rank 3", "(4, 2, 3, 1)"], fn, params, xs[..., None], state0)


@pytest.mark.parametrize("cell", CELLS)
def test_xs_input_size(cell):
    fn, params, xs, state0 = make(cell, 4, 2, 3, 5)
    _raises(ValueError, ["(4, 2, 7)", "n_x=3"], fn, params, jnp.ones((4, 2, 7)), state0)
    # batch-major: the message shows the shapes as given, (B, T, n_x)
    _raises(ValueError, ["(2, 4, 7)", "n_x=3", "(B, T, 3)"], fn, params, jnp.ones((2, 4, 7)),
            state0, time_major=False)


@pytest.mark.parametrize("cell", CELLS)
def test_empty_sequence(cell):
    fn, params, _, state0 = make(cell, 4, 2, 3, 5)
    _raises(ValueError, ["at least one time step", "(0, 2, 3)"], fn, params,
            jnp.ones((0, 2, 3)), state0)


@pytest.mark.parametrize("cell", ["rnn", "gru-course", "gru-cudnn"])
def test_initial_state_shape(cell):
    fn, params, xs, _ = make(cell, 4, 2, 3, 5)
    _raises(ValueError, ["a0", "(3, 5)", "(2, 5)"], fn, params, xs, jnp.zeros((3, 5)))
    _raises(ValueError, ["a0", "(2, 4)", "(2, 5)"], fn, params, xs, jnp.zeros((2, 4)))
    _raises(ValueError, ["a0", "(5,)"], fn, params, xs, jnp.zeros((5,)))


def test_initial_state_shape_batch_major():
    # The batch size is named as such, not placed in a time-major shape.
    fn, params, xs, _ = make("rnn", 4, 2, 3, 5)
    _raises(ValueError, ["a0 has shape (4, 5)", "batch size B=2"], fn, params,
            jnp.swapaxes(xs, 0, 1), jnp.zeros((4, 5)), time_major=False)


@pytest.mark.parametrize("option,value", [
    ("reverse", True), ("time_major", True), ("truncate", 3), ("chunk", 4),
    ("residuals", 10**6), ("slots", 2)])
def test_traced_static_options(option, value):
    # Options that shape the program must be static under jit: the error says how.
    fn, params, xs, state0 = make("lstm", 8, 2, 3, 5)
    extra = dict(residuals="checkpoint") if option == "slots" else {}
    traced = jax.jit(lambda v: fn(params, xs, state0, **extra, **{option: v}))
    with pytest.raises(TypeError, match=re.escape(f"static_argnames=('{option}',)")):
        traced(value)
    jax.jit(lambda: fn(params, xs, state0, **extra, **{option: value}))()  # static: runs


def test_lstm_state_shape_and_type():
    fn, params, xs, state0 = make("lstm", 4, 2, 3, 5)
    bad = jb.LSTMState(state0.a, jnp.zeros((2, 6)))
    _raises(ValueError, ["state0.c", "(2, 6)", "(2, 5)"], fn, params, xs, bad)
    with pytest.raises(TypeError, match="LSTMState"):
        fn(params, xs, (state0.a, state0.c))


@pytest.mark.parametrize("cell", CELLS)
def test_params_inconsistent(cell):
    fn, params, xs, state0 = make(cell, 4, 2, 3, 5)
    field = params._fields[2]  # a weight (Waa / Wi / Wr) or a bias, read against field 0
    bad = params._replace(**{field: jnp.zeros(getattr(params, field).shape[:-1] + (9,))})
    shape = str(tuple(getattr(bad, field).shape))
    _raises(ValueError, [f"{type(params).__name__}.{field}", shape], fn, bad, xs, state0)


@pytest.mark.parametrize("cell", CELLS)
def test_params_first_field_wrong(cell):
    # the sizes are those most fields agree on, so a wrong first field is the one named
    fn, params, xs, state0 = make(cell, 4, 2, 3, 5)
    field = params._fields[0]
    bad = params._replace(**{field: jnp.zeros((6,) + getattr(params, field).shape[1:])})
    with pytest.raises(ValueError) as info:
        fn(bad, xs, state0)
    assert str(info.value).startswith(f"{type(params).__name__}.{field} has shape (6,"), info.value


def test_params_transposed_input_weight():
    # the RNN's n_x comes from Wax alone: the message must not read it from the bad shape
    _, params, xs, a0 = make("rnn", 4, 2, 3, 5)
    _raises(ValueError, ["RNNParams.Wax has shape (3, 5)", "expected (5, n_x)", "n_a=5"],
            jb.rnn, params._replace(Wax=params.Wax.T), xs, a0)


@pytest.mark.parametrize("init", [jb.init_rnn, jb.init_lstm, jb.init_gru])
def test_init_sizes(init):
    key = jax.random.PRNGKey(0)
    with pytest.raises(ValueError, match=re.escape("n_a must be a positive int (the hidden "
                                                   "size), got 0")):
        init(key, 3, 0)
    with pytest.raises(ValueError, match=re.escape("n_x must be a positive int (the input "
                                                   "size), got -1")):
        init(key, -1, 4)
    with pytest.raises(ValueError, match="n_a must be a positive int"):
        init(key, 3, 4.0)


@pytest.mark.parametrize("init", [jb.init_rnn, jb.init_lstm, jb.init_gru, jb.init_output])
def test_init_key_and_dtype(init):
    key = jax.random.PRNGKey(0)
    n = key.shape[0]  # the default implementation's key data: 2 for threefry
    for bad, got in ((0, "got int 0"), (None, "got NoneType None"),
                     (jnp.zeros(2, jnp.float32), "got an array float32(2,)"),
                     (jnp.zeros(n + 1, jnp.uint32), f"got an array uint32({n + 1},)"),
                     (jax.random.split(key, 3), "got an array uint32(3, 2)"),
                     (jax.random.split(jax.random.key(0), 3), "got an array key<fry>(3,)")):
        with pytest.raises(TypeError, match=re.escape(f"key must be one PRNG key, e.g. "
                                                      f"jax.random.key(0) or "
                                                      f"jax.random.PRNGKey(0), {got}")):
            init(bad, 3, 4)
    with pytest.raises(TypeError, match="dtype must be a floating dtype .*got int32"):
        init(key, 3, 4, jnp.int32)
    assert jax.tree.leaves(init(jax.random.key(0), 3, 4, "float32"))[0].dtype == jnp.float32


def test_init_lstm_forget_bias():
    key = jax.random.PRNGKey(0)
    for bad in ("x", float("nan"), float("inf"), jnp.ones(3), None):
        with pytest.raises(ValueError, match=r"forget_bias must be a finite number \(or 4 of "
                                             r"them\), got "):
            jb.init_lstm(key, 3, 4, forget_bias=bad)
    assert jb.init_lstm(key, 3, 4, forget_bias=np.float32(2.0)).bf.tolist() == [2.0] * 4
    assert jb.init_lstm(key, 3, 4, forget_bias=jnp.ones(1)).bf.tolist() == [1.0] * 4
    bf = jb.init_lstm(key, 3, 4, forget_bias=jnp.arange(4.0)).bf
    assert bf.tolist() == [0.0, 1.0, 2.0, 3.0]
    traced = jax.jit(lambda b: jb.init_lstm(key, 3, 4, forget_bias=b).bf)(3.0)
    assert traced.tolist() == [3.0] * 4
    # traced, its shape and dtype are still known: checked, not broadcast into bf
    for bad, got in ((jnp.ones((4, 1)), r"float64\(4, 1\)"), (jnp.ones(3), r"float64\(3,\)"),
                     (jnp.ones(4, jnp.complex64), r"complex64\(4,\)")):
        with pytest.raises(ValueError, match=r"forget_bias must be a finite number \(or 4 of "
                                             r"them\), got a traced " + got):
            jax.jit(lambda b: jb.init_lstm(key, 3, 4, forget_bias=b))(bad)
    assert jax.jit(lambda b: jb.init_lstm(key, 3, 4, forget_bias=b).bf)(True).tolist() == [1] * 4
    half = jnp.full(4, 0.5, jnp.bfloat16)
    assert jb.init_lstm(key, 3, 4, forget_bias=half).bf.tolist() == [0.5] * 4
    assert jax.jit(lambda b: jb.init_lstm(key, 3, 4, forget_bias=b).bf)(half).tolist() == [0.5] * 4
    for bad in ("1", np.ones(4, np.complex64)):  # not parsed, not cut to its real part
        with pytest.raises(ValueError, match="forget_bias must be a finite number"):
            jb.init_lstm(key, 3, 4, forget_bias=bad)
    # bf takes the params' dtype whatever forget_bias's: jb.lstm accepts what init_lstm makes
    for bias in (jnp.ones(4), np.float32(2.0), np.ones(4)):
        p = jb.init_lstm(key, 3, 4, jnp.bfloat16, forget_bias=bias)
        assert {x.dtype for x in p} == {jnp.dtype(jnp.bfloat16)}
        jb.lstm(p, jnp.ones((2, 1, 3), jnp.bfloat16))


def test_init_output_sizes():
    with pytest.raises(ValueError, match=re.escape("n_y must be a positive int (the number of "
                                                   "classes), got 0")):
        jb.init_output(jax.random.PRNGKey(0), 4, 0)


def test_params_rank():
    fn, params, xs, state0 = make("lstm", 4, 2, 3, 5)
    bad = params._replace(bf=params.bf[:, None])
    _raises(ValueError, ["LSTMParams.bf", "rank 1", "(5, 1)"], fn, bad, xs, state0)


@pytest.mark.parametrize("cell", CELLS)
def test_integer_inputs(cell):
    fn, params, xs, state0 = make(cell, 4, 2, 3, 5)
    _raises(TypeError, ["xs", "int32"], fn, params, xs.astype(jnp.int32), state0)


@pytest.mark.parametrize("cell", CELLS)
def test_mixed_dtypes(cell):
    fn, params, xs, state0 = make(cell, 4, 2, 3, 5)
    _raises(TypeError, ["float32", "float64"], fn, params, xs.astype(jnp.float32), state0)
    p32 = jax.tree.map(lambda x: x.astype(jnp.float32), params)
    _raises(TypeError, ["float32", "float64"], fn, p32, xs, state0)
    mixed = params._replace(**{params._fields[1]: getattr(params, params._fields[1]).astype(np.float32)})
    _raises(TypeError, ["mixes dtypes", "float32"], fn, mixed, xs, state0)
    s32 = jax.tree.map(lambda s: s.astype(np.float32), state0)
    _raises(TypeError, ["is float32 but the params are float64; cast"], fn, params, xs, s32)


@pytest.mark.parametrize("cell", CELLS)
def test_unknown_backward(cell):
    fn, params, xs, state0 = make(cell, 4, 2, 3, 5)
    with pytest.raises(ValueError, match=re.escape("'bptt' or 'autodiff', got 'manual'")):
        fn(params, xs, state0, backward="manual")


def test_gru_variant_mismatch():
    _, course, xs, a0 = make("gru-course", 4, 2, 3, 5)
    with pytest.raises(ValueError, match="needs the hidden-side candidate bias bch"):
        jb.gru(course, xs, a0, variant="cudnn")
    cudnn = make("gru-cudnn", 4, 2, 3, 5)[1]
    with pytest.raises(ValueError, match="variant='course'"):
        jb.gru(cudnn, xs, a0, variant="course")
    with pytest.raises(ValueError, match="variant must be one of"):
        jb.gru(cudnn, xs, a0, variant="pytorch")


def test_params_not_arrays():
    _, params, xs, a0 = make("rnn", 4, 2, 3, 5)
    with pytest.raises(TypeError, match="RNNParams.Wax must be an array"):
        jb.rnn(params._replace(Wax=[[1.0]]), xs, a0)


def test_torch_tensors_are_named():
    torch = pytest.importorskip("torch")
    _, params, xs, a0 = make("rnn", 4, 2, 3, 5)
    with pytest.raises(TypeError, match="xs must be a JAX or NumPy array, got a torch.Tensor "
                                        "of dtype torch.float64"):
        jb.rnn(params, torch.tensor(np.asarray(xs)))
    with pytest.raises(TypeError, match="lengths must be a JAX or NumPy array, got a torch"):
        jb.rnn(params, xs, a0, lengths=torch.tensor([4, 2]))
    with pytest.raises(TypeError, match=r"key must be one PRNG key, .*got an array torch.int64"):
        jb.init_rnn(torch.tensor([0, 0]), 3, 4)
    with pytest.raises(TypeError, match=r"lengths is an array of PRNG keys \(key<fry>\), "
                                        r"expected numbers"):
        jb.rnn(params, xs, a0, lengths=jax.random.split(jax.random.key(0), 2))


@pytest.mark.parametrize("cell", ["lstm", "gru-course", "gru-cudnn"])
def test_params_transposed_weights(cell):
    # every weight on [a<t-1>; x<t>] transposed: named as such, not read as n_x < 0
    fn, params, xs, state0 = make(cell, 4, 2, 3, 5)
    bad = params._replace(**{f: getattr(params, f).T for f in params._fields
                             if f[0] == "W" and getattr(params, f).shape[1] == 8})
    field = next(f for f in params._fields if f[0] == "W" and getattr(params, f).shape[1] == 8)
    _raises(ValueError, [f"{type(params).__name__}.{field} has shape (8, 5)",
                         "(n_a, n_a+n_x)", "is it transposed?"], fn, bad, xs, state0)


def test_hidden_size_zero():
    xs = jnp.zeros((4, 2, 3))
    params = jb.RNNParams(jnp.zeros((0, 3)), jnp.zeros((0, 0)), jnp.zeros((0,)))
    _raises(ValueError, ["RNNParams: the hidden size n_a must be >= 1", "'Waa': (0, 0)"],
            jb.rnn, params, xs)


def test_arrays_where_a_structure_belongs():
    # eagerly too the call runs through jit, where arrays are tracers: the message names the
    # array's dtype and shape, not the tracer's type
    fn, params, xs, state0 = make("lstm", 4, 2, 3, 5)
    _raises(TypeError, ["state0 must be an LSTMState(a, c) or None, got an array "
                        "float64(2, 5)"], fn, params, xs, state0.a)
    _raises(TypeError, ["params must be LSTMParams (e.g. from jb.init_lstm), got an array "
                        "float64(5, 8)"], fn, params.Wf, xs)
    for p in (params.Wf, jnp.float64(0.0)):
        with pytest.raises(TypeError) as info:
            jb.residual_plan(p, xs, 1 << 20)
        assert "Tracer" not in str(info.value) and "got an array float64" in str(info.value)


def test_params_of_another_cell():
    fn, params, xs, state0 = make("lstm", 4, 2, 3, 5)
    rnn_params = make("rnn", 4, 2, 3, 5)[1]
    _raises(TypeError, ["params must be LSTMParams", "got RNNParams"], jb.lstm, rnn_params, xs)
    _raises(TypeError, ["params must be GRUParams", "got LSTMParams"], jb.gru, params, xs)
    _raises(TypeError, ["params must be RNNParams", "got dict"], jb.rnn,
            dict(rnn_params._asdict()), xs)


@pytest.mark.parametrize("cell", CELLS)
def test_probe_dtype(cell):
    fn, params, xs, state0 = make(cell, 4, 2, 3, 5)
    probe = jax.tree.map(lambda s: jnp.zeros((4,) + s.shape, jnp.float32), state0)
    _raises(TypeError, ["probe must have the states' dtype", "float32", "float64"],
            lambda p, x, s, pr: fn(p, x, s, probe=pr), params, xs, state0, probe)


@pytest.mark.parametrize("cell", CELLS)
def test_an_empty_batch_runs(cell):
    fn, params, xs, _ = make(cell, 4, 2, 3, 5)
    hs, _ = fn(params, xs[:, :0])
    assert hs.shape == (4, 0, 5)
    assert jb.residual_plan(params, xs[:, :0], 1 << 20).bytes >= 0


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_params_without_inputs(cell):
    # n_x = 0 (an input weight with no columns): refused, not run as an input-free cell.
    fn, params, xs, state0 = make(cell, 4, 2, 3, 5)
    if cell == "rnn":
        bad = params._replace(Wax=params.Wax[:, :0])
        message = r"cannot read an input size n_x >= 1 from shapes"
    else:
        bad = jb.LSTMParams(*(w[:, :5] if w.ndim == 2 else w for w in params))
        message = (r"LSTMParams.Wf has shape \(5, 5\), expected \(n_a, n_a\+n_x\) with "
                   r"n_x >= 1: .* \(none for the inputs\)")
    with pytest.raises(ValueError, match=message):
        fn(bad, xs[..., :0], state0)
