"""residuals="checkpoint", slots=m: Gruslys et al.'s schedule (its gradients against autodiff
are in test_residuals.py, with the other reruns)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cells import CELLS, make
from jaxbptt import slots


def _recursion(n, m):
    """C and F by their recursions, written out with no shortcut (BPTT-HSM)."""
    t = np.arange(n + 1)
    C = np.zeros((n + 1, m + 1), np.int64)
    C[:, 1] = t * (t - 1) // 2
    F = C.copy()
    for s in range(2, n + 1):
        for k in range(2, m + 1):
            C[s, k] = min(y + C[s - y, k - 1] + C[y, k] for y in range(1, s))
            F[s, k] = min(F[s - y, k - 1] + C[y, k] for y in range(1, s))
    return C, F


def test_least_forwards_follow_the_recursion():
    C, F = _recursion(50, 7)
    for t in range(1, 51):
        for k in range(1, 8):
            assert slots._least([t], k)[0] == C[t, k], (t, k)
            assert slots.cost(t, k) == F[t, k], (t, k)
    assert slots.cost(30, 30) == slots.cost(30, 99) == 0  # every start kept by the call
    for n, m in ((10, 0), (10.5, 3), (0, 2), (4, True)):
        with pytest.raises(ValueError, match="ints n >= 1 chunks and m >= 1 slots"):
            slots.cost(n, m)


def test_schedule_of_bad_or_ample_slots():
    for n, m in ((5, 0), (5, -1), (-3, 1), (10.0, 3)):  # m <= 0 once looped for ever
        with pytest.raises(ValueError, match="ints n >= 1 chunks and m >= 1 slots"):
            slots.schedule(n, m)
    for m in (5, 7):  # a slot for every chunk start: nothing rerun
        plan = slots.schedule(5, m)
        assert plan.slot.tolist() == plan.start.tolist() == list(range(5))
        assert plan.forwards == slots.cost(5, m) == 0


def test_schedule_delivers_every_state():
    # Plays the driver's protocol with each state standing for its position: every
    # backward must find the state entering its chunk, after `cost` chunk forwards.
    for n in range(2, 41):
        for m in range(1, n):
            plan = slots.schedule(n, m)
            assert plan.forwards == slots.cost(n, m)
            assert set(plan.slot) <= set(range(m + 1)) and plan.slot[0] == 0
            buffer, forwards = [None] * (m + 1), 0
            for q in range(n):  # the call's forward
                buffer[plan.slot[q]] = q
            for u in range(n - 1, -1, -1):
                state = buffer[plan.slot[plan.start[u]]]
                assert state == plan.start[u] <= u, (n, m, u)
                for q in range(plan.start[u], u):
                    state = q + 1
                    buffer[plan.slot[state]] = state
                    forwards += 1
                assert state == u
            assert forwards == plan.forwards, (n, m)


@pytest.mark.parametrize("with_lengths", [False, True])
def test_memory_does_not_grow_with_T(with_lengths):
    # m slots of K steps: XLA's temp memory is the same at T = 256 and 4096 but for at
    # most a few bytes per step (with lengths, the steps' int32 times), where one start
    # per chunk grows 16-fold (a property of the compiled program). Lengths add no copy
    # of xs (B n_x 4 = 256 bytes per step): padded steps' inputs are zeroed chunk by chunk.
    def temp(T, **kw):
        fn, params, xs, state0 = make("lstm", T, 8, 8, 32, dtype=np.float32)
        lengths = jnp.arange(T - 7, T + 1) if with_lengths else None

        def loss(p, x):
            return jnp.sum(fn(p, x, state0, residuals="checkpoint", lengths=lengths, **kw)[0])
        return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, xs).compile(
        ).memory_analysis().temp_size_in_bytes

    assert temp(4096, chunk=4, slots=12) - temp(256, chunk=4, slots=12) <= 4 * (4096 - 256)
    assert temp(4096, chunk=4) > 8 * temp(256, chunk=4)


def test_bad_slots():
    fn, params, xs, state0 = make("gru-course", 10, 2, 3, 4)
    with pytest.raises(ValueError, match="slots= needs residuals='checkpoint' and an int"):
        fn(params, xs, state0, slots=3)
    with pytest.raises(ValueError, match="slots= needs residuals='checkpoint' and an int"):
        fn(params, xs, state0, residuals="checkpoint", chunk=(4, 2), slots=3)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match=r"slots must be a positive int \(a static number "
                                             r"of chunk starts\)"):
            fn(params, xs, state0, residuals="checkpoint", slots=bad)
    with pytest.raises(ValueError, match="slots= cannot be given with a memory budget"):
        fn(params, xs, state0, residuals=10**9, slots=3)


@pytest.mark.parametrize("cell", CELLS)
def test_hessian_works_gradient_of_gradient_does_not(cell):
    # The reruns loop a number of times known only inside the backward's scan: JAX
    # differentiates that loop forward (jax.hessian, forward over reverse, equals
    # autodiff's) but not in reverse, so a gradient of the gradient raises at trace time.
    fn, params, xs, state0 = make(cell, 8, 2, 3, 3)

    def loss(xs, **kw):
        return jnp.sum(jnp.sin(fn(params, xs, state0, **kw)[0]))

    slots = dict(residuals="checkpoint", chunk=1, slots=2)
    got = jax.jit(jax.hessian(lambda x: loss(x, **slots)))(xs)
    want = jax.hessian(lambda x: loss(x, backward="autodiff"))(xs)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.max(np.abs(want)))

    def penalty(xs):
        return jnp.sum(jax.grad(lambda x: loss(x, **slots))(xs) ** 2)

    with pytest.raises(ValueError, match="while_loop"):  # JAX's own message
        jax.grad(penalty)(xs)
