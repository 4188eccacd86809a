"""The softmax output layer and its hand-written cross-entropy gradient ŷ - y."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbptt as jb
from cells import make, rel_err


def _problem(T=5, B=3, n_a=4, n_y=6, seed=0):
    rng = np.random.default_rng(seed)
    out = jb.OutputParams(jnp.asarray(rng.normal(size=(n_y, n_a))),
                          jnp.asarray(rng.normal(size=(n_y,))))
    hs = jnp.asarray(rng.normal(size=(T, B, n_a)))
    labels = jnp.asarray(rng.integers(0, n_y, size=(T, B)))
    weights = jnp.asarray(rng.uniform(size=(T, B)))
    return out, hs, labels, weights


def test_predict_is_softmax():
    out, hs, _, _ = _problem()
    probs = jb.predict(out, hs)
    z = np.asarray(hs) @ np.asarray(out.Wya).T + np.asarray(out.by)
    ref = np.exp(z - z.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    np.testing.assert_allclose(probs, ref, rtol=1e-13)


def test_loss_value_against_numpy():
    out, hs, labels, weights = _problem()
    probs = np.asarray(jb.predict(out, hs))
    ref = -np.sum(np.asarray(weights) * np.log(np.take_along_axis(
        probs, np.asarray(labels)[..., None], -1)[..., 0]))
    for backward in ("bptt", "autodiff"):
        np.testing.assert_allclose(jb.cross_entropy(out, hs, labels, weights, backward=backward),
                                   ref, rtol=1e-13)


@pytest.mark.parametrize("use_weights", [False, True])
def test_hand_gradient_equals_autodiff(use_weights):
    out, hs, labels, weights = _problem()
    w = weights if use_weights else None

    def grads(backward):
        return jax.jit(jax.grad(lambda o, h, w: 3.0 * jb.cross_entropy(o, h, labels, w, backward=backward),
                                argnums=(0, 1, 2) if use_weights else (0, 1)))(out, hs, w)

    assert rel_err(grads("bptt"), grads("autodiff")) < 1e-13


def test_end_to_end_through_lstm():
    # Loss on an LSTM's outputs: both halves by hand equal autodiff all the way down.
    fn, params, xs, state0 = make("lstm", 6, 3, 2, 4)
    out, _, labels, _ = _problem(T=6, B=3, n_a=4, n_y=5)

    def loss(params, out, backward):
        hs, _ = fn(params, xs, state0, backward=backward)
        return jb.cross_entropy(out, hs, labels, backward=backward)

    g_b = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(params, out, "bptt")
    g_a = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(params, out, "autodiff")
    assert rel_err(g_b, g_a) < 1e-12


def test_bad_labels_and_shapes():
    out, hs, labels, _ = _problem()
    with pytest.raises(ValueError, match=r"labels must have shape .*\(5, 3\), got \(5, 2\)"):
        jb.cross_entropy(out, hs, labels[:, :2])
    with pytest.raises(TypeError, match="labels must be integer class indices, got float64"):
        jb.cross_entropy(out, hs, labels.astype(jnp.float64))
    with pytest.raises(ValueError, match=r"weights must have shape .*\(5, 3\), got \(5,\)"):
        jb.cross_entropy(out, hs, labels, weights=jnp.ones(5))
    with pytest.raises(TypeError, match="weights must have hs's dtype float64, got float32"):
        jb.cross_entropy(out, hs, labels, weights=jnp.ones(labels.shape, jnp.float32))
    with pytest.raises(ValueError, match=r"hs has shape \(5, 3, 3\)"):
        jb.cross_entropy(out, hs[..., :3], labels)
    with pytest.raises(TypeError, match="one float dtype"):
        jb.cross_entropy(out, hs.astype(jnp.float32), labels)
    with pytest.raises(TypeError, match="hs must be an array, got list"):
        jb.cross_entropy(out, hs.tolist(), labels)
    with pytest.raises(TypeError, match="weights must be an array, got list"):
        jb.cross_entropy(out, hs, labels, weights=jnp.ones(labels.shape).tolist())
    with pytest.raises(TypeError, match="params must be OutputParams .*got dict"):
        jb.cross_entropy(out._asdict(), hs, labels)
    with pytest.raises(ValueError, match=r"hs has shape \(5, 3, 3\) but Wya"):  # predict too
        jb.predict(out, hs[..., :3])
    with pytest.raises(TypeError, match="params must be OutputParams .*got dict"):
        jb.predict(out._asdict(), hs)


def test_labels_outside_the_classes_count_for_nothing():
    # -1 (a common padding label) or n_y: no loss and no gradient at that position, in
    # the hand-written backward as in autodiff, as if its weight were 0.
    out, hs, labels, weights = _problem()
    bad = labels.at[0, 0].set(-1).at[2, 1].set(6).at[4, 2].set(100)
    mask = jnp.ones_like(weights).at[0, 0].set(0).at[2, 1].set(0).at[4, 2].set(0)

    def loss(out, hs, labels, weights, backward):
        return jb.cross_entropy(out, hs, labels, weights, backward=backward)

    grad = jax.value_and_grad(loss, argnums=(0, 1))
    ref = grad(out, hs, labels, weights * mask, "autodiff")
    for backward in ("bptt", "autodiff"):
        assert rel_err(grad(out, hs, bad, weights, backward), ref) < 1e-12, backward
    # Not even a NaN there reaches the loss or a gradient (dhs is zero there).
    nan = hs.at[0, 0].set(jnp.nan).at[4, 2].set(jnp.inf)
    for backward in ("bptt", "autodiff"):
        value, (d_out, d_hs) = grad(out, nan, bad, weights, backward)
        assert rel_err((value, d_out), (ref[0], ref[1][0])) < 1e-12, backward
        assert rel_err(d_hs, ref[1][1] * mask[..., None]) < 1e-12, backward


def test_labels_of_a_narrow_integer_type():
    # n_y = 300 does not fit in int8/uint8: the labels are compared with it in int32.
    out = jb.init_output(jax.random.PRNGKey(0), 4, 300, jnp.float64)
    hs = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 4), jnp.float64)
    labels = jnp.array([[10, 100, 120], [0, 50, -1]])
    ref = jb.cross_entropy(out, hs, labels)
    for dtype in (jnp.int8, jnp.int16, jnp.int64):
        assert jb.cross_entropy(out, hs, labels.astype(dtype)) == ref, dtype
    assert jb.cross_entropy(out, hs, jnp.abs(labels).astype(jnp.uint8)) == jb.cross_entropy(
        out, hs, jnp.abs(labels))
