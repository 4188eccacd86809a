"""`jaxbptt.gradflow`: the initialisations it compares, the adjoint norms it measures
(against a NumPy loop), its record during training, and which way its plots run."""

import jax
import jax.numpy as jnp
import matplotlib.axes
import numpy as np
import pytest

from jaxbptt import gradflow, tasks, train
from jaxbptt.lstm import init_lstm, lstm
from jaxbptt.rnn import init_rnn, rnn


def _init(name, n_x=4, n_a=256):
    return gradflow.INITS[name][1](jax.random.PRNGKey(0), n_x, n_a)


def test_the_initialisations_are_what_their_names_say():
    for name, variance in (("RNN, Gaussian Waa (σ²=1/n_a)", 1.0),
                           ("RNN, Gaussian Waa (σ²=2/n_a)", 2.0)):
        Waa = np.asarray(_init(name).Waa)
        assert abs(Waa.std() / np.sqrt(variance / 256) - 1) < 0.02, name
    Waa = np.asarray(_init("RNN, orthogonal Waa").Waa)
    np.testing.assert_allclose(Waa @ Waa.T, np.eye(256), atol=1e-5)
    assert np.all(_init("LSTM, forget bias 0").bf == 0)
    assert np.all(_init("LSTM, forget bias 1").bf == 1)
    assert _init("GRU (course)").bch is None and _init("GRU (cuDNN)").bch is not None


def test_mean_norm_keeps_tiny_adjoints():
    # Squares of float32 numbers near 1e-25 underflow; the norm is taken in float64.
    norm = gradflow._mean_norm(np.full((1, 2, 4), 1e-25, np.float32))
    assert norm == pytest.approx([2e-25], rel=1e-6, abs=0)


def _u(n_a, seed=0):
    u = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), (n_a,), jnp.float64))
    return u / np.linalg.norm(u)


def test_rnn_adjoints_against_a_numpy_loop():
    # dL_T/da<t> = Waaᵀ ((1 - a<t+1>²) dL_T/da<t+1>), from u at t = T.
    T, B, n_x, n_a = 7, 3, 2, 5
    p = init_rnn(jax.random.PRNGKey(1), n_x, n_a, jnp.float64)
    xs = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (T, B, n_x), jnp.float64))
    Wax, Waa, ba = map(np.asarray, p)
    a, hs = np.zeros((B, n_a)), []
    for t in range(T):
        a = np.tanh(xs[t] @ Wax.T + a @ Waa.T + ba)
        hs.append(a)
    d, want = np.tile(_u(n_a), (B, 1)), []
    for t in reversed(range(T)):
        want.append(np.linalg.norm(d, axis=1).mean())
        d = ((1 - hs[t] ** 2) * d) @ Waa
    got = gradflow.adjoint_norms(rnn, p, jnp.asarray(xs))
    np.testing.assert_allclose(got["a"], want[::-1], rtol=1e-12)
    assert got["a"][-1] == pytest.approx(1.0)


def test_lstm_cell_adjoint_at_the_last_steps():
    # The state is the pair (a<t>, c<t>): L_T = u·a<T> does not read c<T> but through a<T>,
    # so ∂L_T/∂c<T> = 0, and ∂L_T/∂c<T-1> = u Γo<T> (1 - tanh² c<T>) Γf<T>.
    T, B, n_x, n_a = 4, 3, 2, 5
    p = init_lstm(jax.random.PRNGKey(1), n_x, n_a, jnp.float64)
    xs = jax.random.normal(jax.random.PRNGKey(2), (T, B, n_x), jnp.float64)
    hs, (_, c_T) = lstm(p, xs)
    concat = np.concatenate([hs[-2], xs[-1]], axis=1)
    gate = lambda W, b: 1 / (1 + np.exp(-(concat @ np.asarray(W).T + np.asarray(b))))  # noqa: E731
    dc = _u(n_a) * gate(p.Wo, p.bo) * (1 - np.tanh(np.asarray(c_T)) ** 2) * gate(p.Wf, p.bf)
    got = gradflow.adjoint_norms(lstm, p, xs)
    assert got["a"][-1] == pytest.approx(1.0) and got["c"][-1] == 0.0
    assert got["c"][-2] == pytest.approx(np.linalg.norm(dc, axis=1).mean(), rel=1e-12)


def test_during_training_records_the_run_train_makes():
    seen = []
    steps, norms, losses = gradflow.during_training("rnn", T=6, steps=4, every=2, hidden=8,
                                                    batch=4, on_step=lambda *a: seen.append(a))
    assert steps.tolist() == [0, 2, 4] and norms.shape == (3, 6) and losses.shape == (4,)
    assert seen == [(k + 1, loss) for k, loss in enumerate(losses.tolist())]
    config = train.Config(task="adding", cell="rnn", hidden=8, T=6, steps=4, batch=4, lr=0.01,
                          clip="norm", clip_value=1.0, save_every=4, sample_every=0)
    task = tasks.get("adding", 6)
    params, opt_state = train.init(config, task)
    step_fn = train.make_step(config, task)
    want = []
    for step in range(4):
        params, opt_state, loss = step_fn(params, opt_state, task.batch(0, step, 4))
        want.append(float(loss))
    np.testing.assert_allclose(losses, want, rtol=1e-6)
    assert not np.allclose(norms[0], norms[-1])


def test_during_training_measures_the_hidden_adjoint_on_a_held_out_batch():
    _, norms, _ = gradflow.during_training("lstm", T=5, steps=0, every=1, hidden=4, batch=3)
    config = train.Config(task="adding", cell="lstm", hidden=4, T=5, batch=3, lr=0.01,
                          clip="norm", clip_value=1.0)
    task = tasks.get("adding", 5)
    params, _ = train.init(config, task)
    batch = task.batch(1, 10**6, 3)  # (seed + 1, a step training never reaches)
    probe = gradflow.zeros_probe(lstm(params["cell"], batch.xs)[1], 5)
    g = jax.grad(lambda q: train.loss_fn(config, task, params, batch, q))(probe)
    np.testing.assert_allclose(norms[0], gradflow._mean_norm(g.a), rtol=1e-6)


def test_plots_run_from_the_loss_backwards(tmp_path, monkeypatch):
    # Lag 0 (the last step, norm 1 at init) is the first point of each curve and the first
    # column of each heat map.
    drawn = {}
    semilogy, imshow = matplotlib.axes.Axes.semilogy, matplotlib.axes.Axes.imshow

    def curve(self, x, y, **kw):
        drawn["y"] = y
        return semilogy(self, x, y, **kw)

    def heat_map(self, img, **kw):
        drawn["img"] = img
        return imshow(self, img, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "semilogy", curve)
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", heat_map)
    gradflow.plot_at_init({"x": {"a": np.array([1e-3, 1e-2, 1e-1, 1.0])}}, tmp_path / "i.png", 4)
    assert list(drawn["y"]) == [1.0, 1e-1, 1e-2, 1e-3]
    norms = np.array([[1e-4, 1e-2, 1.0], [1e-3, 1e-1, 1.0]])
    gradflow.plot_training({"rnn": (np.array([0, 5]), norms, None)}, tmp_path / "t.png", 3)
    np.testing.assert_allclose(drawn["img"], np.log10(norms[:, ::-1]))


def test_bad_arguments_are_named():
    params = init_rnn(jax.random.PRNGKey(0), 3, 4)
    cases = [(lambda: gradflow.adjoint_norms(rnn, params, jnp.ones((5, 3))),
              r"xs must have rank 3 with shape \(T, B, n_x\), got shape \(5, 3\)"),
             (lambda: gradflow.at_init(T=-1), "T must be a positive int, got -1"),
             (lambda: gradflow.at_init(n_a=0), "n_a must be a positive int, got 0"),
             (lambda: gradflow.during_training("foo"), "cell must be one of 'rnn', 'lstm', "
                                                      "'gru', got 'foo'"),
             (lambda: gradflow.during_training("rnn", every=0), "every must be a positive int"),
             (lambda: gradflow.during_training("rnn", T=0), "T must be a positive int"),
             (lambda: gradflow.during_training("rnn", batch=0), "batch must be a positive int"),
             (lambda: gradflow.during_training("rnn", steps=-1), "steps must be an int >= 0")]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
