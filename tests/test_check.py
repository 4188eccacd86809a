"""`jaxbptt.check`, the `jaxbptt check` command's comparison: it notices small errors."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxbptt import _driver, check
from jaxbptt.lstm import LSTMState, lstm
from cells import broken_backward


def _result(errors):
    return check.Result("rnn", "tanh", "float64", "cpu", "default", errors, 1e-12)


def test_the_worst_error_decides_and_nan_fails():
    assert check.TOLERANCE == {"float64": 1e-12, "float32": 2e-5}
    assert _result({"x": 0.0, "y": 1.0}).worst == 1.0 and not _result({"x": 0.0, "y": 1.0}).ok
    assert not _result({"x": 1e-16, "y": float("nan")}).ok  # a NaN anywhere fails
    assert _result({"x": 1e-16, "y": 9e-13}).ok


def test_relative_error_is_normwise():
    assert check.relative_error([1.0, 2.0], [1.0, 4.0]) == 0.5  # 2 / max|ref|
    assert check.relative_error(np.ones(3), np.zeros(3)) == 1.0  # against a zero gradient


def test_the_problem_crosses_chunks():
    # The default case runs the LSTM and GRU over chunks of 8, 8 and a shorter 3; the options
    # case runs every cell over chunks of 4 and a last of 3, with three lengths.
    _, _, xs, _ = check.problem("lstm", "course", jnp.float64, jax.random.PRNGKey(0))
    T = xs.shape[0]
    assert _driver.chunk_size(T, _driver.Options()) == 8 and T % 8 == 3
    assert check.CASES["options"]["chunk"] == 4 and T % 4 == 3
    assert check.lengths_for("options", xs).tolist() == [T, T - 4, 1]


def test_one_device_per_platform():
    platforms = [d.platform for d in check.devices()]
    assert platforms[0] == "cpu" and len(set(platforms)) == len(platforms), platforms


def test_the_problem_has_no_zero_parameter_or_state():
    # Random biases and states: no gradient is trivially zero or trivially right.
    for cell, variant in check.CELLS:
        _, params, _, state0 = check.problem(cell, variant, jnp.float64, jax.random.PRNGKey(0))
        for leaf in jax.tree.leaves((params, state0)):
            assert np.all(np.asarray(leaf) != 0), (cell, variant)


def test_a_gradient_off_by_1e_9_fails(monkeypatch):
    cpu = jax.devices("cpu")[0]
    assert check.check_one("rnn", "tanh", "float64", cpu).ok
    with broken_backward(monkeypatch, "rnn", lambda da, dz: (da, dz * (1 + 1e-9))):
        result = check.check_one("rnn", "tanh", "float64", cpu)
    assert not result.ok and 1e-10 < result.worst < 1e-8, result.errors


def test_the_final_cell_state_is_checked():
    # A backward that drops the cotangent of c<T> must fail: the loss weights state_T.
    def dropped(params, xs, state0, backward="bptt"):
        hs, s = lstm(params, xs, state0, backward=backward)
        return hs, LSTMState(s.a, jax.lax.stop_gradient(s.c) if backward == "bptt" else s.c)

    key = jax.random.PRNGKey(0)
    _, params, xs, state0 = check.problem("lstm", "course", jnp.float64, key)
    wrong, right = (check.gradients(dropped, params, xs, state0, b, key)
                    for b in ("bptt", "autodiff"))
    assert check.relative_error(wrong[2].c, right[2].c) > 1e-3


def test_errors_are_named_after_their_gradients(monkeypatch):
    # The LSTM's c0 error is c0's: with dc carried through Γf dropped, bptt's dc0 is zero.
    with broken_backward(monkeypatch, "lstm", lambda ds, dz: (ds._replace(c=0 * ds.c), dz)):
        errors = check.check_one("lstm", "course", "float64", jax.devices("cpu")[0]).errors
    assert list(errors)[-3:] == ["xs", "a0", "c0"] and list(errors)[0] == "LSTMParams.Wf"
    assert errors["c0"] == 1.0 and errors["a0"] < 1.0, errors
