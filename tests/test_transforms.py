"""The custom_vjp composes with vmap, nested grad and jit; forward mode raises."""

import jax
import jax.numpy as jnp
import pytest

from cells import CELLS, loss_fn, make, rel_err, sweep

TOL = 1e-12


@pytest.mark.parametrize("cell", CELLS)
def test_vmap_of_grad_equals_loop(cell):
    # A batch of independent problems (a leading axis on params, xs and state0).
    problems = [make(cell, 5, 2, 3, 4, seed=s) for s in range(3)]
    fn = problems[0][0]
    loss = loss_fn(*problems[0], backward="bptt")
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *[p[1:] for p in problems])
    batched = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2))))(*stacked)
    for i, (_, *args) in enumerate(problems):
        one = jax.grad(loss_fn(fn, *args, backward="autodiff"), argnums=(0, 1, 2))(*args)
        assert rel_err(jax.tree.map(lambda x: x[i], batched), one) < TOL


@pytest.mark.parametrize("cell", CELLS)
def test_grad_of_vmap(cell):
    # Parameters shared, inputs vmapped over a leading axis (e.g. sub-batches).
    fn, params, xs, state0 = make(cell, 5, 2, 3, 4)
    xss = jnp.stack([xs, 2 * xs, -xs])

    def total(params, backward):
        hs, _ = jax.vmap(lambda x: fn(params, x, state0, backward=backward))(xss)
        return jnp.sum(jnp.sin(hs))

    g_b = jax.jit(jax.grad(total), static_argnums=1)(params, "bptt")
    g_a = jax.jit(jax.grad(total), static_argnums=1)(params, "autodiff")
    assert rel_err(g_b, g_a) < TOL


# Truncation's cuts are constants to every order (the forward's stop_gradient), also
# for the states each policy's backward rebuilds.
SECOND_ORDER = {
    "default": {},
    "truncate-lengths-reverse": dict(truncate=2, lengths=jnp.array([6, 3]), reverse=True),
    "truncate-states": dict(truncate=3, residuals="states", chunk=4),
    "truncate-checkpoint-nested": dict(truncate=2, residuals="checkpoint", chunk=(4, 2)),
}


@pytest.mark.parametrize("cell,options", sweep(SECOND_ORDER, in_ci=("lstm",)))
def test_reverse_over_reverse(cell, options):
    # grad of a function of grad: a gradient-norm penalty, as in WGAN-GP or
    # double backprop. The backward rule is itself differentiated.
    fn, params, xs, state0 = make(cell, 7, 2, 3, 3)

    def penalty(params, backward):
        g = jax.grad(loss_fn(fn, params, xs, state0, backward=backward,
                             **SECOND_ORDER[options]), argnums=1)(params, xs, state0)
        return jnp.sum(g**2)

    g_b = jax.jit(jax.grad(penalty), static_argnums=1)(params, "bptt")
    g_a = jax.jit(jax.grad(penalty), static_argnums=1)(params, "autodiff")
    assert rel_err(g_b, g_a) < 1e-12


@pytest.mark.parametrize("cell", CELLS)
def test_forward_mode_raises_on_bptt(cell):
    # custom_vjp defines reverse mode only: jvp/jacfwd through backward="bptt" raise,
    # and work through backward="autodiff".
    fn, params, xs, state0 = make(cell, 3, 2, 2, 3)
    with pytest.raises(TypeError, match="forward-mode|jvp"):
        jax.jvp(lambda x: fn(params, x, state0, backward="bptt")[0], (xs,), (xs,))
    with pytest.raises(TypeError, match="forward-mode|jvp"):
        jax.jacfwd(lambda x: fn(params, x, state0, backward="bptt")[0])(xs)
    jax.jvp(lambda x: fn(params, x, state0, backward="autodiff")[0], (xs,), (xs,))


@pytest.mark.parametrize("cell", CELLS)
def test_jit_and_eager_forward_agree(cell):
    # Op by op (an eager call alone runs compiled, as jit does: test_eager.py).
    fn, params, xs, state0 = make(cell, 6, 3, 2, 4)
    with jax.disable_jit():
        eager = fn(params, xs, state0)
    jitted = jax.jit(fn)(params, xs, state0)
    assert rel_err(eager, jitted) < TOL
