"""Cross-checks against PyTorch: nn.RNN (tanh), nn.LSTM and nn.GRU, float64.

For random torch modules (one layer, bias on, time-major), random inputs and
initial states, and the random linear loss

    L = sum(out * W1) + sum(h_n * W2) (+ sum(c_n * W3) for the LSTM),

jaxbptt (under ``jax.jit``, with both ``backward="bptt"`` and ``"autodiff"``)
must reproduce torch's outputs, final states and autograd gradients with respect
to the inputs, the initial states and all four torch weights.

The jaxbptt params are built from the torch weights by ``*_params`` below, a
linear map written in jnp. The JAX loss is differentiated with respect to the
*torch-layout* weights, so the chain rule through that map carries the jaxbptt
gradients back to torch's layout: e.g. the gradient of the LSTM's ``bf`` lands
on both the f-rows of ``bias_ih_l0`` and of ``bias_hh_l0``, and the GRU's ``Wu``
gradient lands, negated, on the z-rows of both weight matrices. The map is
injective on gradients, so an error in any jaxbptt parameter gradient shows up
in some torch-layout gradient.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbptt as jb

torch = pytest.importorskip("torch")

FWD_RTOL = 1e-12  # elementwise, plus FWD_ATOL for entries near zero (values are O(1))
FWD_ATOL = 1e-15
GRAD_RTOL = 1e-12  # normwise: max|diff| / max|ref|

# (T, B, n_x, n_a): T = B = n_x = 1; B = n_a = 1; a general one (n_x != n_a).
SHAPES = [(1, 1, 1, 3), (4, 1, 2, 1), (5, 3, 4, 6)]
TORCH_WEIGHTS = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")


# --- torch weights -> jaxbptt params (linear, in jnp so that grads flow back) ---

def rnn_params(w_ih, w_hh, b_ih, b_hh):
    return jb.RNNParams(Wax=w_ih, Waa=w_hh, ba=b_ih + b_hh)


def lstm_params(w_ih, w_hh, b_ih, b_hh):
    # torch stacks the gate rows as i, f, g, o; our W* act on [a_prev; x].
    Wi, Wf, Wc, Wo = jnp.split(jnp.concatenate([w_hh, w_ih], axis=1), 4)
    bi, bf, bc, bo = jnp.split(b_ih + b_hh, 4)
    return jb.LSTMParams(Wf=Wf, bf=bf, Wi=Wi, bi=bi, Wc=Wc, bc=bc, Wo=Wo, bo=bo)


def gru_params(w_ih, w_hh, b_ih, b_hh):
    # torch stacks r, z, n; its z is our 1 - Γu = σ(-zu).
    Wr, Wz, Wn = jnp.split(jnp.concatenate([w_hh, w_ih], axis=1), 3)
    b_ir, b_iz, b_in = jnp.split(b_ih, 3)
    b_hr, b_hz, b_hn = jnp.split(b_hh, 3)
    return jb.GRUParams(Wu=-Wz, bu=-(b_iz + b_hz), Wr=Wr, br=b_ir + b_hr,
                        Wc=Wn, bc=b_in, bch=b_hn)


def run_jaxbptt(kind, params, xs, states, backward):
    """``(hs, finals)``, finals a tuple like ``states``: (a,) or (a, c) for the LSTM."""
    if kind == "rnn":
        hs, a = jb.rnn(params, xs, states[0], backward=backward)
        return hs, (a,)
    if kind == "lstm":
        hs, s = jb.lstm(params, xs, jb.LSTMState(*states), backward=backward)
        assert isinstance(s, jb.LSTMState)
        return hs, (s.a, s.c)
    hs, a = jb.gru(params, xs, states[0], backward=backward, variant="cudnn")
    return hs, (a,)


TO_PARAMS = {"rnn": rnn_params, "lstm": lstm_params, "gru": gru_params}


def _jax_loss(weights, xs, states, cots, *, kind, backward):
    hs, finals = run_jaxbptt(kind, TO_PARAMS[kind](*weights), xs, states, backward)
    loss = jnp.sum(hs * cots[0]) + sum(jnp.sum(f * w) for f, w in zip(finals, cots[1:]))
    return loss, (hs, finals)


# ((loss, (hs, finals)), (d weights, d xs, d states)), one compile per case.
jax_loss_and_grads = jax.jit(
    jax.value_and_grad(_jax_loss, argnums=(0, 1, 2), has_aux=True),
    static_argnames=("kind", "backward"))


# --- the torch side ---

def make_case(kind, T, B, n_x, n_a, seed=0):
    """A random torch module, inputs, initial states and loss weights (all float64)."""
    torch.manual_seed(seed)
    cls = {"rnn": functools.partial(torch.nn.RNN, nonlinearity="tanh"),
           "lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind]
    module = cls(n_x, n_a, num_layers=1, bias=True, batch_first=False,
                 dtype=torch.float64)
    with torch.no_grad():  # default biases are small and alike: make both clearly nonzero
        module.bias_ih_l0.add_(0.5 * torch.randn_like(module.bias_ih_l0))
        module.bias_hh_l0.add_(0.5 * torch.randn_like(module.bias_hh_l0))
    n_states = 2 if kind == "lstm" else 1
    xs = torch.randn(T, B, n_x, dtype=torch.float64)
    states = tuple(torch.randn(B, n_a, dtype=torch.float64) for _ in range(n_states))
    cots = (torch.randn(T, B, n_a, dtype=torch.float64),) + tuple(
        torch.randn(B, n_a, dtype=torch.float64) for _ in range(n_states))
    return module, xs, states, cots


def torch_reference(module, xs, states, cots):
    """Torch's (out, finals, loss, grads); grads = (weights, xs, states) as numpy."""
    xs = xs.clone().requires_grad_(True)
    states = tuple(s.clone().requires_grad_(True) for s in states)
    layered = tuple(s[None] for s in states)  # (num_layers=1, B, n_a)
    out, finals = module(xs, layered if len(layered) == 2 else layered[0])
    finals = tuple(f[0] for f in finals) if isinstance(finals, tuple) else (finals[0],)
    loss = (out * cots[0]).sum() + sum((f * w).sum() for f, w in zip(finals, cots[1:]))
    module.zero_grad()
    loss.backward()
    weights = tuple(getattr(module, name) for name in TORCH_WEIGHTS)
    grads = (tuple(_np(w.grad) for w in weights), _np(xs.grad),
             tuple(_np(s.grad) for s in states))
    return _np(out), tuple(_np(f) for f in finals), loss.item(), grads


def _np(tensor):
    return tensor.detach().numpy()


def to_jax(tensors):
    """A tensor, or a tuple of tensors, as JAX arrays."""
    if isinstance(tensors, torch.Tensor):
        return jnp.asarray(tensors.detach().numpy())
    return tuple(jnp.asarray(t.detach().numpy()) for t in tensors)


def assert_normwise_close(actual, ref, rtol, what):
    actual, ref = np.asarray(actual), np.asarray(ref)
    assert actual.shape == ref.shape, f"{what}: shape {actual.shape} != {ref.shape}"
    assert actual.dtype == np.float64, f"{what}: dtype {actual.dtype}"
    scale = np.max(np.abs(ref))
    assert scale > 0, f"{what}: the reference is all zeros, the check would be vacuous"
    err = np.max(np.abs(actual - ref)) / scale
    assert err <= rtol, f"{what}: normwise relative error {err:.3g} > {rtol:g}"


# --- the test ---

@pytest.mark.parametrize("backward", ["bptt", "autodiff"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}-B{}-nx{}-na{}".format(*s))
@pytest.mark.parametrize("kind", ["rnn", "lstm", "gru"])
def test_matches_torch(kind, shape, backward):
    module, xs, states, cots = make_case(kind, *shape)
    out, finals, loss, (dweights, dxs, dstates) = torch_reference(module, xs, states, cots)

    weights = to_jax(getattr(module, name) for name in TORCH_WEIGHTS)
    (jloss, (hs, jfinals)), (jdweights, jdxs, jdstates) = jax_loss_and_grads(
        weights, to_jax(xs), to_jax(states), to_jax(cots), kind=kind, backward=backward)

    # Forward: outputs, final states (h_n, and c_n for the LSTM), the loss.
    np.testing.assert_allclose(hs, out, rtol=FWD_RTOL, atol=FWD_ATOL, err_msg="outputs")
    assert len(jfinals) == len(finals) == len(states)
    for name, jf, f in zip(("h_n", "c_n"), jfinals, finals):
        np.testing.assert_allclose(jf, f, rtol=FWD_RTOL, atol=FWD_ATOL, err_msg=name)
    np.testing.assert_allclose(jloss, loss, rtol=FWD_RTOL, atol=FWD_ATOL, err_msg="loss")

    # Gradients: inputs, initial states, the four torch weights.
    assert_normwise_close(jdxs, dxs, GRAD_RTOL, "dL/dxs")
    assert len(jdstates) == len(dstates) == len(states)
    for name, jd, d in zip(("dL/dh0", "dL/dc0"), jdstates, dstates):
        assert_normwise_close(jd, d, GRAD_RTOL, name)
    assert len(jdweights) == len(dweights) == len(TORCH_WEIGHTS)
    for name, jd, d in zip(TORCH_WEIGHTS, jdweights, dweights):
        assert_normwise_close(jd, d, GRAD_RTOL, f"dL/d{name}")
