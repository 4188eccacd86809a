"""`init_rnn`, `init_lstm`, `init_gru`: the values their docstrings promise."""

import jax
import numpy as np
import pytest

import jaxbptt as jb

N_X, N_A = 3, 100  # weights uniform in ±1/sqrt(n_a) = ±0.1


@pytest.mark.parametrize("init", [jb.init_rnn, jb.init_lstm, jb.init_gru,
                                  lambda *a: jb.init_gru(*a, variant="cudnn")])
def test_weights_uniform_in_plus_minus_one_over_sqrt_n_a(init):
    params = init(jax.random.PRNGKey(0), N_X, N_A)
    for name, w in params._asdict().items():
        if name.startswith("W"):
            w = np.asarray(w)
            assert w.max() <= 0.1 and w.max() > 0.099 and w.min() < -0.099, name
            # Uniform: σ = 0.1/√3; five standard errors of the sample mean and std.
            sigma, n = 0.1 / np.sqrt(3), w.size
            assert abs(w.mean()) < 5 * sigma / np.sqrt(n), name
            assert abs(w.std() - sigma) < 5 * sigma * np.sqrt(0.8 / n) / 2, name


def test_biases():
    key = jax.random.PRNGKey(0)
    assert not np.any(jb.init_rnn(key, N_X, N_A).ba)
    p = jb.init_lstm(key, N_X, N_A)
    assert np.all(p.bf == 1.0) and not np.any(p.bi) and not np.any(p.bc) and not np.any(p.bo)
    assert np.all(jb.init_lstm(key, N_X, N_A, forget_bias=0.5).bf == 0.5)
    course, cudnn = jb.init_gru(key, N_X, N_A), jb.init_gru(key, N_X, N_A, variant="cudnn")
    assert course.bch is None and cudnn.bch.shape == (N_A,) and not np.any(cudnn.bch)
    for p in (course, cudnn):
        assert not np.any(p.bu) and not np.any(p.br) and not np.any(p.bc)
