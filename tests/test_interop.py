"""jaxbptt.interop: PyTorch and Flax conversions, checked against the libraries themselves.

PyTorch (float64): ``jb.stack(from_torch(m), ...)`` against ``m`` run on a
``pack_padded_sequence`` (``enforce_sorted=False``) of ragged lengths, for
nn.RNN / nn.LSTM / nn.GRU of 1-3 layers, uni- and bidirectional, random h_0
(and c_0): outputs, h_n (c_n), and the gradients of a random linear loss with
respect to the inputs, the initial states and every torch parameter, with both
``backward="bptt"`` and ``"autodiff"`` under ``jax.jit``. The parameter
gradients are carried back to torch's layout by the chain rule: the JAX loss is
differentiated with respect to the torch-layout weights, mapped to jaxbptt's
params by ``layers_from_weights`` below (a jnp transcription of the mapping,
checked to give exactly what ``from_torch`` gives). The map is injective on
gradients, so an error in any jaxbptt parameter gradient shows in some torch one.

Flax (float64): ``flax.linen.RNN(cell)`` with ``seq_lengths`` against
``jb.lstm/gru/rnn(from_flax(...), lengths=...)``: valid outputs, final carry
and gradients with respect to the flax params, inputs and initial carry.

Plus round trips (to_torch/from_torch, to_flax/from_flax), pytree structure,
and the errors for what is not supported. Each section skips without its library.
"""

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbptt as jb
from cells import params as random_params
from cells import rel_err
from jaxbptt import interop

FWD_TOL = 1e-12  # normwise relative; forward values are O(1)
GRAD_TOL = 1e-12
T, B, N_X, N_A = 5, 4, 3, 4
LENGTHS = np.array([5, 1, 3, 4])  # unsorted; one full (= T), one of length 1


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


@pytest.fixture(scope="module")
def nn():
    pytest.importorskip("flax")
    import flax.linen

    return flax.linen


def test_imports_without_torch_and_flax():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['flax'] = None\n"
            "import jaxbptt.interop as m\n"
            "assert 'torch' not in [k for k, v in sys.modules.items() if v is not None]\n"
            "print(m.__all__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "from_torch" in out.stdout


# === PyTorch ==========================================================================

KINDS = {"rnn": "RNN", "lstm": "LSTM", "gru": "GRU"}


def make_module(kind, num_layers=1, bidirectional=False, *, bias=True, seed=0,
                dtype="float64", input_size=N_X, hidden_size=N_A, **kwargs):
    import torch

    torch.manual_seed(seed)
    cls = getattr(torch.nn, KINDS[kind])
    if kind == "rnn":
        kwargs.setdefault("nonlinearity", "tanh")
    return cls(input_size, hidden_size, num_layers=num_layers, bias=bias,
               bidirectional=bidirectional, dtype=getattr(torch, dtype), **kwargs)


# --- torch-layout weights -> jaxbptt layers, in jnp so that gradients flow back ---

def _rnn(w_ih, w_hh, b_ih, b_hh):
    return jb.RNNParams(Wax=w_ih, Waa=w_hh, ba=b_ih + b_hh)


def _lstm(w_ih, w_hh, b_ih, b_hh):
    Wi, Wf, Wc, Wo = jnp.split(jnp.concatenate([w_hh, w_ih], axis=1), 4)  # rows i, f, g, o
    bi, bf, bc, bo = jnp.split(b_ih + b_hh, 4)
    return jb.LSTMParams(Wf=Wf, bf=bf, Wi=Wi, bi=bi, Wc=Wc, bc=bc, Wo=Wo, bo=bo)


def _gru(w_ih, w_hh, b_ih, b_hh):
    Wr, Wz, Wn = jnp.split(jnp.concatenate([w_hh, w_ih], axis=1), 3)  # rows r, z, n
    b_ir, b_iz, b_in = jnp.split(b_ih, 3)
    b_hr, b_hz, b_hn = jnp.split(b_hh, 3)
    return jb.GRUParams(Wu=-Wz, bu=-(b_iz + b_hz), Wr=Wr, br=b_ir + b_hr, Wc=Wn, bc=b_in,
                        bch=b_hn)


def layers_from_weights(weights, kind, num_layers, D):
    """jaxbptt layers from a dict of torch-layout arrays (missing biases read as zeros)."""
    layers = []
    for l in range(num_layers):
        dirs = []
        for sfx in ("", "_reverse")[:D]:
            w_ih, w_hh = weights[f"weight_ih_l{l}{sfx}"], weights[f"weight_hh_l{l}{sfx}"]
            zeros = jnp.zeros(w_ih.shape[:1], w_ih.dtype)
            b_ih = weights.get(f"bias_ih_l{l}{sfx}", zeros)
            b_hh = weights.get(f"bias_hh_l{l}{sfx}", zeros)
            dirs.append({"rnn": _rnn, "lstm": _lstm, "gru": _gru}[kind](w_ih, w_hh, b_ih, b_hh))
        layers.append(jb.Bidirectional(*dirs) if D == 2 else dirs[0])
    return tuple(layers)


def _jax_loss(weights, xs, init, cots, lengths, *, kind, num_layers, D, backward):
    layers = layers_from_weights(weights, kind, num_layers, D)
    ys, finals = jb.stack(layers, xs, init, lengths=lengths, backward=backward)
    loss = jnp.sum(ys * cots[0]) + sum(
        jnp.sum(f * c) for f, c in zip(jax.tree.leaves(finals), cots[1:], strict=True))
    return loss, (ys, finals)


@functools.partial(jax.jit, static_argnames=("kind", "num_layers", "D"))
def jax_both(weights, xs, init, cots, lengths, *, kind, num_layers, D):
    """{backward: ((loss, (ys, finals)), (d weights, d xs, d init))}, one compile per case."""
    vg = jax.value_and_grad(_jax_loss, argnums=(0, 1, 2), has_aux=True)
    return {b: vg(weights, xs, init, cots, lengths, kind=kind, num_layers=num_layers, D=D,
                  backward=b) for b in ("bptt", "autodiff")}


def torch_reference(module, xs, states, cots, lengths):
    """Torch on a packed batch: (out, finals, loss, {name: grad}, d xs, d states) as NumPy."""
    import torch
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    xs = xs.clone().requires_grad_(True)
    states = tuple(s.clone().requires_grad_(True) for s in states)
    packed = pack_padded_sequence(xs, torch.as_tensor(lengths), enforce_sorted=False)
    out, finals = module(packed, states if len(states) == 2 else states[0])
    out, out_lengths = pad_packed_sequence(out, total_length=xs.shape[0])
    assert out_lengths.tolist() == list(lengths)
    finals = tuple(finals) if isinstance(finals, tuple) else (finals,)
    loss = (out * cots[0]).sum() + sum((f * c).sum() for f, c in zip(finals, cots[1:]))
    module.zero_grad()
    loss.backward()
    grads = {name: p.grad.numpy() for name, p in module.named_parameters()}

    def np_(t):
        return t.detach().numpy()

    return (np_(out), tuple(map(np_, finals)), loss.item(), grads, np_(xs.grad),
            tuple(np_(s.grad) for s in states))


def _case(kind, num_layers, D, seed=0, **module_kwargs):
    """A module and random float64 inputs, initial states and loss weights (torch tensors)."""
    import torch

    module = make_module(kind, num_layers, D == 2, seed=seed, **module_kwargs)
    gen = torch.Generator().manual_seed(seed + 1)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    n_states = 2 if kind == "lstm" else 1
    xs = randn(T, B, N_X)
    states = tuple(randn(num_layers * D, B, N_A) for _ in range(n_states))
    cots = (randn(T, B, D * N_A),) + tuple(randn(num_layers * D, B, N_A)
                                           for _ in range(n_states))
    return module, xs, states, cots


def _jnp(t):
    return jnp.asarray(t.detach().numpy())


def _assert_close(actual, ref, tol, what):
    actual, ref = np.asarray(actual), np.asarray(ref)
    assert np.max(np.abs(ref)) > 0, f"{what}: the reference is all zeros (a vacuous check)"
    err = rel_err(actual, ref)
    assert err <= tol, f"{what}: normwise relative error {err:.3g} > {tol:g}"


# (kind, num_layers, D, bias): every cell uni- and bidirectional, 1 to 3 layers, with and
# without biases (kept few: each case compiles a stack's forward and both backwards).
STACK_CASES = [("rnn", 1, 1, True), ("rnn", 2, 2, True),
               ("lstm", 1, 2, True), ("lstm", 3, 1, True),
               ("gru", 1, 1, False), ("gru", 2, 2, True)]


@pytest.mark.parametrize("kind,num_layers,D,bias", STACK_CASES,
                         ids=[f"{k}-L{n}-D{d}" + ("" if b else "-nobias")
                              for k, n, d, b in STACK_CASES])
def test_stack_matches_torch_packed(torch, kind, num_layers, D, bias):
    module, xs, states, cots = _case(kind, num_layers, D, bias=bias)
    out, finals, loss, grads, dxs, dstates = torch_reference(module, xs, states, cots, LENGTHS)
    assert np.all(out[LENGTHS[1]:, 1] == 0)  # torch pads with zeros past each length
    assert len(grads) == (4 if bias else 2) * num_layers * D

    weights = {name: _jnp(p) for name, p in module.named_parameters()}
    # The test's mapping is from_torch's, exactly: the gradients below check both.
    expected = layers_from_weights(weights, kind, num_layers, D)
    got = interop.from_torch(module)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        assert g.dtype == e.dtype == jnp.float64 and np.array_equal(g, e)
        assert np.any(g) == (bias or g.ndim == 2)  # bias=False: zero biases (bch too)

    init = jb.LSTMState(*map(_jnp, states)) if kind == "lstm" else _jnp(states[0])
    results = jax_both(weights, _jnp(xs), init, tuple(map(_jnp, cots)), jnp.asarray(LENGTHS),
                       kind=kind, num_layers=num_layers, D=D)
    for backward, ((jloss, (ys, jfinals)), (dweights, djxs, dinit)) in results.items():
        msg = f"{kind} L={num_layers} D={D} bias={bias} {backward}"
        _assert_close(ys, out, FWD_TOL, f"{msg}: outputs")
        assert isinstance(jfinals, jb.LSTMState) == (kind == "lstm")
        names = ("h_n", "c_n")[:len(finals)]
        for name, jf, f in zip(names, jax.tree.leaves(jfinals), finals, strict=True):
            _assert_close(jf, f, FWD_TOL, f"{msg}: {name}")
        assert abs(float(jloss) - loss) <= FWD_TOL * max(1.0, abs(loss)), msg
        _assert_close(djxs, dxs, GRAD_TOL, f"{msg}: dL/dxs")
        names = ("dL/dh0", "dL/dc0")[:len(dstates)]
        for name, jd, d in zip(names, jax.tree.leaves(dinit), dstates, strict=True):
            _assert_close(jd, d, GRAD_TOL, f"{msg}: {name}")
        assert set(dweights) == set(grads)
        for name, d in grads.items():
            _assert_close(dweights[name], d, GRAD_TOL, f"{msg}: dL/d{name}")


# --- round trips, structure, dtypes ---

def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-15), ("float32", 1e-6)])
@pytest.mark.parametrize("kind", list(KINDS))
def test_to_torch_from_torch_is_identity(torch, kind, dtype, tol):
    module = make_module(kind, 2, True, dtype=dtype)
    before = _state(module)
    assert interop.to_torch(interop.from_torch(module), module) is module
    after = module.state_dict()
    assert list(after) == list(before)
    for name, value in before.items():
        assert after[name].dtype == value.dtype
        if name.startswith("weight"):
            assert torch.equal(after[name], value), name  # bit-identical
        else:  # bias_ih = (b_ih + b_hh) - b_hh: round-off only
            assert rel_err(after[name].numpy(), value.numpy()) <= tol, name
            if kind == "gru":  # the n rows are copied, not recomputed
                assert torch.equal(after[name][2 * N_A:], value[2 * N_A:]), name
            if name.startswith("bias_hh"):
                assert torch.equal(after[name], value), name


@pytest.mark.parametrize("kind", list(KINDS))
def test_from_torch_to_torch_is_identity(torch, kind):
    layers = interop.from_torch(make_module(kind, 3, True, seed=1))
    module = make_module(kind, 3, True, seed=2)
    back = interop.from_torch(interop.to_torch(layers, module))
    assert jax.tree.structure(back) == jax.tree.structure(layers)
    for (path, b), ref in zip(jax.tree_util.tree_leaves_with_path(back),
                              jax.tree.leaves(layers), strict=True):
        name = jax.tree_util.keystr(path)
        assert b.dtype == ref.dtype, name
        if ".W" in name:
            assert np.array_equal(b, ref), name
        else:
            assert rel_err(b, ref) <= 1e-15, name


@pytest.mark.parametrize("kind", list(KINDS))
def test_to_torch_makes_module_compute_the_same(torch, kind):
    src, xs, states, _ = _case(kind, 2, 2, seed=4)
    dst = make_module(kind, 2, True, seed=5)
    hx = states if kind == "lstm" else states[0]
    with torch.no_grad():
        ref_out, ref_h = src(xs, hx)
        assert rel_err(dst(xs, hx)[0].numpy(), ref_out.numpy()) > 1e-3  # differ before
        interop.to_torch(interop.from_torch(src), dst)
        out, h = dst(xs, hx)
    _assert_close(out.numpy(), ref_out.numpy(), FWD_TOL, "outputs")
    for a, b in zip(jax.tree.leaves(h), jax.tree.leaves(ref_h), strict=True):
        _assert_close(a.numpy(), b.numpy(), FWD_TOL, "final states")


def test_to_torch_casts_to_module_dtype(torch):
    layers = interop.from_torch(make_module("lstm", 1, False, seed=6))  # float64
    module = interop.to_torch(layers, make_module("lstm", 1, False, dtype="float32"))
    back = interop.from_torch(module)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(back))
    assert rel_err(jax.tree.map(lambda x: x.astype(jnp.float64), back), layers) < 1e-6


@pytest.mark.parametrize("kind", list(KINDS))
def test_bfloat16_modules(torch, kind):
    # NumPy has no bfloat16: the weights go through float32 (exactly) both ways.
    module = make_module(kind, 2, True, dtype="bfloat16")
    before = _state(module)
    layers = interop.from_torch(module)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(layers))
    fwd = layers[0].fwd
    w_hh = before["weight_hh_l0"].float().numpy()
    got = getattr(fwd, {"lstm": "Wi", "gru": "Wr", "rnn": "Waa"}[kind])[:, :N_A]
    assert np.array_equal(np.asarray(got, np.float32), w_hh[:N_A])  # copied, not rounded
    interop.to_torch(layers, module)
    for name, value in before.items():
        after = module.state_dict()[name]
        assert after.dtype == torch.bfloat16
        if not name.startswith("bias_ih"):  # bias_ih = (b_ih + b_hh) - b_hh, in bfloat16
            assert torch.equal(after, value), name
    xs = torch.randn(T, B, N_X, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = module(xs.to(torch.bfloat16))[0].float().numpy()
    ys = jb.stack(layers, jnp.asarray(xs.numpy(), jnp.bfloat16))[0]
    assert rel_err(np.asarray(ys, np.float32), ref) < 3e-2  # bfloat16 keeps 8 bits


@pytest.mark.parametrize("kind", list(KINDS))
def test_same_architecture_same_structure(torch, kind):
    # Different weights (seeds), with or without biases: one structure, one leaf layout.
    trees = [interop.from_torch(make_module(kind, 2, True, seed=seed, bias=bias))
             for seed, bias in ((0, True), (1, True), (2, False))]
    assert len({jax.tree.structure(t) for t in trees}) == 1
    shapes = [[(x.shape, x.dtype) for x in jax.tree.leaves(t)] for t in trees]
    assert shapes[0] == shapes[1] == shapes[2]
    layer = trees[0][1]
    assert isinstance(layer, jb.Bidirectional)
    assert type(layer.fwd) is {"rnn": jb.RNNParams, "lstm": jb.LSTMParams,
                               "gru": jb.GRUParams}[kind]
    n_in = 2 * N_A  # layer 1 reads both directions of layer 0
    W = layer.bwd.Wax if kind == "rnn" else layer.bwd.Wc
    assert W.shape == ((N_A, n_in) if kind == "rnn" else (N_A, N_A + n_in))
    assert not any(np.array_equal(a, b) for a, b in
                   zip(jax.tree.leaves(trees[0][0]), jax.tree.leaves(trees[1][0]))
                   if a.ndim == 2)  # different seeds, different weights
    uni = interop.from_torch(make_module(kind, 2, False))
    assert jax.tree.structure(uni) != jax.tree.structure(trees[0])


def test_from_torch_copies_and_keeps_dtype(torch):
    module = make_module("rnn", 1, False, dtype="float32")
    (p,) = interop.from_torch(module)
    assert isinstance(p.Wax, jax.Array) and p.Wax.dtype == jnp.float32
    before = np.array(p.Wax)
    with torch.no_grad():
        module.weight_ih_l0.add_(1.0)  # the JAX arrays must not alias torch's memory
    assert np.array_equal(p.Wax, before)
    assert not np.array_equal(module.weight_ih_l0.detach().numpy(), before)


# --- errors ---

def test_without_torch_or_flax_the_error_says_what_to_install(monkeypatch):
    for name in ("torch", "flax", "flax.linen"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(ImportError, match=r"from_torch needs torch: pip install torch==2.13.0"):
        interop.from_torch(object())
    with pytest.raises(ImportError, match=r"to_torch needs torch: pip install torch==2.13.0"):
        interop.to_torch((), object())
    with pytest.raises(ImportError, match=r"from_flax needs flax: .*'jaxbptt\[interop\]'"):
        interop.from_flax({}, object())


@pytest.mark.parametrize("fn", ["from_torch", "to_torch"])
def test_unsupported_torch_modules(torch, fn):
    def call(module):
        if fn == "from_torch":
            return interop.from_torch(module)
        return interop.to_torch(interop.from_torch(make_module("lstm")), module)

    with pytest.raises(ValueError, match=r"proj_size=2 > 0 is not supported"):
        call(make_module("lstm", proj_size=2))
    with pytest.raises(ValueError, match=r"nonlinearity='relu' is not supported"):
        call(make_module("rnn", nonlinearity="relu"))
    with pytest.raises(ValueError, match=r"batch_first=True is not supported: jaxbptt is "
                                         r"time-major.*batch_first=False"):
        call(make_module("gru", batch_first=True))
    with pytest.raises(TypeError, match=r"must be a torch.nn.RNN, nn.LSTM or nn.GRU, got "
                                        r"torch.nn.modules.linear.Linear"):
        call(torch.nn.Linear(3, 4))
    with pytest.raises(TypeError, match=r"LSTMCell is a single cell"):
        call(torch.nn.LSTMCell(3, 4))
    with pytest.raises(TypeError, match=r"must be a torch.nn.RNN.*got builtins.str"):
        call("LSTM")


def test_from_torch_float64_needs_x64(torch):
    module = make_module("gru")
    with jax.enable_x64(False):
        with pytest.raises(ValueError, match=r"float64 but JAX's 64-bit mode is off"):
            interop.from_torch(module)
        assert interop.from_torch(make_module("gru", dtype="float32"))[0].Wu.dtype == np.float32


def test_to_torch_architecture_mismatch(torch):
    lstm2 = interop.from_torch(make_module("lstm", 2, False))
    cases = [
        (lstm2, make_module("lstm", 3), ValueError, r"2 layers but the nn.LSTM has num_layers=3"),
        (lstm2, make_module("lstm", 2, True), ValueError,
         r"layer 0 is not Bidirectional but the nn.LSTM has bidirectional=True"),
        (interop.from_torch(make_module("lstm", 2, True)), make_module("lstm", 2), ValueError,
         r"layer 0 is Bidirectional but the nn.LSTM has bidirectional=False"),
        (lstm2, make_module("gru", 2), TypeError,
         r"layer 0 holds LSTMParams but the module is an nn.GRU, which needs GRUParams"),
        (lstm2, make_module("lstm", 2, hidden_size=5), ValueError,
         r"layer 0 LSTMParams.Wf has shape \(4, 7\), expected \(5, 8\).*hidden_size=5"),
        (lstm2, make_module("lstm", 2, input_size=2), ValueError,
         r"layer 0 LSTMParams.Wf has shape \(4, 7\), expected \(4, 6\).*input_size=2"),
        ((jb.init_gru(jax.random.PRNGKey(0), N_X, N_A, jnp.float64),), make_module("gru"),
         ValueError, r"layer 0 is a 'course' GRU \(bch is None\)"),
        (lstm2, make_module("lstm", 2, bias=False), ValueError,
         r"bias=False but layer 0 has a nonzero bf"),
        (lstm2[0], make_module("lstm", 2), TypeError,
         r"layers must be a tuple .*got LSTMParams \(wrap a single layer as \(params,\)\)"),
        ((lstm2[0]._replace(Wf=lstm2[0].Wf.astype(jnp.complex128)), lstm2[1]),
         make_module("lstm", 2), TypeError, r"layer 0 LSTMParams.Wf is complex128: the params "
                                            r"must be floating"),
    ]
    for layers, module, exc, match in cases:
        before = _state(module)
        with pytest.raises(exc, match=match):
            interop.to_torch(layers, module)
        after = module.state_dict()  # nothing was written
        assert all(torch.equal(after[k], v) for k, v in before.items()), match
    # Zero biases do go into a bias=False module.
    no_bias = make_module("lstm", 2, bias=False)
    zeroed = jax.tree.map(lambda x: x if x.ndim == 2 else jnp.zeros_like(x), lstm2)
    back = interop.from_torch(interop.to_torch(zeroed, no_bias))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back),
                                                    jax.tree.leaves(zeroed), strict=True))


# === Flax =============================================================================

FLAX_CASES = [("LSTMCell", {}), ("OptimizedLSTMCell", {}), ("GRUCell", {}),
              ("SimpleCell", {}), ("SimpleCell", {"residual": True})]
FLAX_IDS = [n + ("-residual" if a else "") for n, a in FLAX_CASES]


def _flax_case(nn, name, attrs, seed=0):
    """(cell, rnn, params of the rnn with every leaf random, xs (B, T, n_x), carry0)."""
    cell = getattr(nn, name)(features=N_A, dtype=jnp.float64, param_dtype=jnp.float64,
                             **attrs)
    rnn = nn.RNN(cell, return_carry=True)
    rng = np.random.default_rng(seed)
    xs = jnp.asarray(rng.normal(size=(B, T, N_X)))
    carry = cell.initialize_carry(jax.random.PRNGKey(0), (B, N_X))
    # nn.RNN(cell) keeps the cell's params under "cell"; one step of the cell makes them.
    params = {"cell": cell.init(jax.random.PRNGKey(seed), carry, xs[:, 0])["params"]}
    params = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.5, x.shape)), params)
    carry0 = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.5, x.shape)), carry)
    return cell, rnn, params, xs, carry0


def _jb_fn(name):
    return {"SimpleCell": jb.rnn, "GRUCell": jb.gru}.get(name, jb.lstm)


@pytest.mark.parametrize("name,attrs", FLAX_CASES[:4], ids=FLAX_IDS[:4])
def test_matches_flax_rnn(nn, name, attrs):
    cell, rnn, params, xs, carry0 = _flax_case(nn, name, attrs)
    lstm = "LSTM" in name
    lengths = jnp.asarray(LENGTHS)
    valid = (jnp.arange(T)[None, :] < lengths[:, None])[:, :, None]  # (B, T, 1)
    rng = np.random.default_rng(7)
    w = jnp.asarray(rng.normal(size=(B, T, N_A)))
    v = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape)), carry0)

    def loss(out, carry):
        return jnp.sum(out * w) + sum(jnp.sum(c * d) for c, d in
                                      zip(jax.tree.leaves(carry), jax.tree.leaves(v),
                                          strict=True))

    def flax_loss(params, xs, carry0):
        carry, out = rnn.apply({"params": params}, xs, initial_carry=carry0,
                               seq_lengths=lengths)
        out = jnp.where(valid, out, 0.0)  # flax keeps stepping through the padding
        return loss(out, carry), (out, carry)

    def jb_loss(params, xs, carry0):
        p = interop.from_flax({"params": params}, cell)  # an nn.RNN's variables
        state0 = jb.LSTMState(a=carry0[1], c=carry0[0]) if lstm else carry0
        hs, state_T = _jb_fn(name)(p, xs, state0, lengths=lengths, backward="bptt",
                                   time_major=False)
        carry = (state_T.c, state_T.a) if lstm else state_T
        return loss(hs, carry), (hs, carry)

    @jax.jit
    def both(params, xs, carry0):
        grad = functools.partial(jax.value_and_grad, argnums=(0, 1, 2), has_aux=True)
        return grad(flax_loss)(params, xs, carry0), grad(jb_loss)(params, xs, carry0)

    ((fl, (fout, fcarry)), fgrads), ((jl, (jout, jcarry)), jgrads) = both(params, xs, carry0)
    assert not np.any(np.where(valid, 0.0, jout))  # jaxbptt: zeros past each length
    assert rel_err(jout, fout) <= FWD_TOL, "outputs"
    assert rel_err(jcarry, fcarry) <= FWD_TOL, "final carry"
    assert abs(float(jl - fl)) <= FWD_TOL * abs(float(fl))
    assert jax.tree.structure(jgrads) == jax.tree.structure(fgrads)
    for (path, jg), fg in zip(jax.tree_util.tree_leaves_with_path(jgrads),
                              jax.tree.leaves(fgrads), strict=True):
        where = jax.tree_util.keystr(path)
        assert np.max(np.abs(fg)) > 0, f"{where}: vacuous"
        assert rel_err(jg, fg) <= GRAD_TOL, f"{name} d{where}: {rel_err(jg, fg):.3g}"


@pytest.mark.parametrize("name,attrs", FLAX_CASES, ids=FLAX_IDS)
def test_flax_round_trips(nn, name, attrs):
    cell, rnn, params, _, _ = _flax_case(nn, name, attrs, seed=1)
    cell_params = params["cell"]
    p = interop.from_flax(cell_params, cell)
    if not attrs:  # a residual cell's name says nothing of its residual
        assert jax.tree.all(jax.tree.map(np.array_equal, interop.from_flax(params, name), p))
    back = interop.to_flax(p, rnn)["params"]
    assert jax.tree.structure(back) == jax.tree.structure(cell_params)
    tol = 1e-15 if attrs.get("residual") else 0.0  # Waa = h.kernel^T + I, then - I
    assert rel_err(back, cell_params) <= tol
    # jaxbptt params -> flax -> jaxbptt is exact (no residual) and runs the same cell.
    kind = {"SimpleCell": "rnn", "GRUCell": "gru-cudnn"}.get(name, "lstm")
    q = random_params(kind, N_X, N_A, seed=2)
    q2 = interop.from_flax(interop.to_flax(q, cell), cell)
    assert type(q2) is type(q) and rel_err(q2, q) <= tol
    if attrs.get("residual"):  # not in test_matches_flax_rnn: check the forward here
        xs = jnp.asarray(np.random.default_rng(3).normal(size=(B, T, N_X)))
        carry = cell.initialize_carry(jax.random.PRNGKey(0), (B, N_X))
        _, out = rnn.apply({"params": {"cell": interop.to_flax(q, cell)["params"]}}, xs,
                           initial_carry=carry)
        hs, _ = _jb_fn(name)(q, xs, time_major=False)
        assert rel_err(hs, out) <= FWD_TOL


def test_flax_errors(nn):
    cell = nn.GRUCell(features=N_A)
    p = interop.to_flax(random_params("gru-cudnn", N_X, N_A), cell)["params"]
    with pytest.raises(TypeError, match=r"unsupported flax cell MGUCell"):
        interop.from_flax(p, nn.MGUCell(features=N_A))
    with pytest.raises(ValueError, match=r"activation_fn=.* is not supported"):
        interop.from_flax(p, nn.GRUCell(features=N_A, activation_fn=nn.relu))
    with pytest.raises(ValueError, match=r"gate_fn=.* is not supported"):
        interop.from_flax(p, nn.GRUCell(features=N_A, gate_fn=nn.hard_sigmoid))
    with pytest.raises(ValueError, match=r"activation_fn=.* is not supported"):
        interop.to_flax(interop.from_flax(p, cell),
                        nn.SimpleCell(features=N_A, activation_fn=nn.relu))
    with pytest.raises(ValueError, match=r"features=5 but its params have n_a=4"):
        interop.from_flax(p, nn.GRUCell(features=5))
    with pytest.raises(ValueError, match=r"one of \('LSTMCell'"):
        interop.from_flax(p, "LSTM")
    with pytest.raises(ValueError, match=r"GRUCell params must have the Dense layers"):
        interop.from_flax({k: v for k, v in p.items() if k != "hn"}, cell)
    with pytest.raises(ValueError, match=r"LSTMCell params must have the Dense layers"):
        interop.from_flax(p, "LSTMCell")
    with pytest.raises(ValueError, match=r"params\['hn'\] must hold \['bias', 'kernel'\]"):
        interop.from_flax({**p, "hn": {"kernel": p["hn"]["kernel"]}}, cell)
    bad = {**p, "iz": {**p["iz"], "kernel": p["iz"]["kernel"][:2]}}
    with pytest.raises(ValueError, match=r"params\['iz'\]\['kernel'\] has shape \(2, 4\), "
                                         r"expected \(3, 4\)"):
        interop.from_flax(bad, cell)
    with pytest.raises(TypeError, match=r"expected flax variables or params"):
        interop.from_flax([p], cell)
    # ranks and dtypes are checked before any size is read from a kernel
    for kernel, exc, match in (
            (p["iz"]["kernel"][None], ValueError, r"\['iz'\]\['kernel'\] has shape \(1, 3, 4\), "
                                                  r"expected rank 2"),
            (np.float64(1.0), ValueError, r"\['iz'\]\['kernel'\] has shape \(\), expected rank 2"),
            (None, TypeError, r"\['iz'\]\['kernel'\] must be an array, got NoneType"),
            (p["iz"]["kernel"].astype(jnp.int32), TypeError, r"is int32: the params must be "
                                                            r"floating"),
            (p["iz"]["kernel"].astype(jnp.float32), TypeError,
             r"\['iz'\]\['kernel'\] is float32 but the other params are float64")):
        with pytest.raises(exc, match=match):
            interop.from_flax({**p, "iz": {**p["iz"], "kernel": kernel}}, cell)
    course = jb.init_gru(jax.random.PRNGKey(0), N_X, N_A, jnp.float64)
    with pytest.raises(ValueError, match=r"GRUCell is the 'cudnn' variant"):
        interop.to_flax(course, cell)
    with pytest.raises(TypeError, match=r"a GRUCell needs GRUParams, got LSTMParams"):
        interop.to_flax(jb.init_lstm(jax.random.PRNGKey(0), N_X, N_A), cell)
    with pytest.raises(ValueError, match=r"features=5 but the params have n_a=4"):
        interop.to_flax(interop.from_flax(p, cell), nn.GRUCell(features=5))
    lstm = jb.init_lstm(jax.random.PRNGKey(0), N_X, N_A)
    with pytest.raises(ValueError, match=r"^to_flax: LSTMParams.Wi has shape \(4, 9\), "
                                         r"expected \(4, 7\)"):
        interop.to_flax(lstm._replace(Wi=jnp.zeros((N_A, 9))), nn.LSTMCell(features=N_A))
    rnn = jb.init_rnn(jax.random.PRNGKey(0), N_X, N_A)
    with pytest.raises(ValueError, match=r"^to_flax: RNNParams.Waa has shape \(4, 5\)"):
        interop.to_flax(rnn._replace(Waa=jnp.zeros((N_A, 5))), nn.SimpleCell(features=N_A))
