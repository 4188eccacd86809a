"""Conversion between jaxbptt params and PyTorch / Flax recurrent layers.

PyTorch: ``from_torch(module)`` turns a ``torch.nn.RNN`` (tanh), ``LSTM`` or
``GRU`` (any ``num_layers``, ``bidirectional``, ``bias``) into the ``layers``
tuple of `jaxbptt.stack` (a cell's params per layer, or a `Bidirectional` pair
built from the ``*_reverse`` weights); ``to_torch(layers, module)`` writes them
back. Per layer ``l`` (and direction), with W_i* / W_h* the gate's rows of
``weight_ih_l{l}`` / ``weight_hh_l{l}`` (stacked i, f, g, o for the LSTM and
r, z, n for the GRU) and b_i* / b_h* those of ``bias_ih_l{l}`` / ``bias_hh_l{l}``::

    RNN   Wax = weight_ih_l{l}    Waa = weight_hh_l{l}    ba = b_ih + b_hh
    LSTM  Wi = [W_hi, W_ii]       bi = b_ii + b_hi        (likewise Wf, bf from f
          Wc = [W_hg, W_ig]       bc = b_ig + b_hg         and Wo, bo from o)
    GRU   Wu = -[W_hz, W_iz]      bu = -(b_iz + b_hz)     (torch's z is 1 - Γu,
          Wr =  [W_hr, W_ir]      br = b_ir + b_hr         and 1 - σ(v) = σ(-v))
          Wc =  [W_hn, W_in]      bc = b_in               bch = b_hn

torch keeps two biases per gate where jaxbptt keeps one, so ``to_torch`` keeps
the module's ``bias_hh`` and writes ``bias_ih = ours - bias_hh`` (the GRU's
n rows exactly: ``b_in = bc``, ``b_hn = bch``). ``bias=False`` reads as zero
biases. The initial and final states of `jaxbptt.stack` are laid out as
torch's ``h_0``/``h_n`` (and ``LSTMState(h, c)`` for ``(h_n, c_n)``).

Flax (``flax.linen``): ``from_flax(variables, cell)`` turns the params of one
cell into a cell's params for `jaxbptt.rnn` / `lstm` / `gru`, ``to_flax`` goes
back. A Dense ``kernel`` is (in, out), the transpose of ours::

    LSTMCell,           W* = [h*.kernel^T, i*.kernel^T]   b* = h*.bias
    OptimizedLSTMCell   (* = f, i, o; Wc, bc from g; i* Dense layers have no bias)
    GRUCell             Wu = -[hz.kernel^T, iz.kernel^T]  bu = -iz.bias
                        Wr =  [hr.kernel^T, ir.kernel^T]  br =  ir.bias
                        Wc =  [hn.kernel^T, in.kernel^T]  bc =  in.bias, bch = hn.bias
    SimpleCell          Wax = i.kernel^T, Waa = h.kernel^T (+ I if residual), ba = i.bias

Flax's GRUCell is the ``"cudnn"`` variant (its z is 1 - Γu). Flax's LSTM carry
is ``(c, h)``, jaxbptt's `LSTMState` is ``(a, c)`` with a = h.

torch and flax are imported inside the functions that need them: this module
imports without either.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxbptt import _checks, memory
from jaxbptt.gru import GRUParams
from jaxbptt.lstm import LSTMParams
from jaxbptt.rnn import RNNParams
from jaxbptt.stack import Bidirectional

__all__ = ["from_torch", "to_torch", "from_flax", "to_flax"]

# --- PyTorch ---------------------------------------------------------------------------

_TORCH_KINDS = {"RNN_TANH": RNNParams, "LSTM": LSTMParams, "GRU": GRUParams}
_TORCH_NAMES = {"RNN_TANH": "nn.RNN", "LSTM": "nn.LSTM", "GRU": "nn.GRU"}
_N_GATES = {"RNN_TANH": 1, "LSTM": 4, "GRU": 3}
_SUFFIXES = ("", "_reverse")


def _require(name, where, install):
    """The module ``name``, or an ImportError saying how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"{where} needs {name.split('.')[0]}: {install}") from e


def _torch_arch(module, where):
    """(mode, num_layers, D, input_size, hidden_size, bias, torch dtype), or a clear error."""
    torch = _require("torch", where, "pip install torch==2.13.0 (its CPU build; see the "
                     "README's Install)")

    if not isinstance(module, torch.nn.RNNBase):
        hint = ""
        if isinstance(module, torch.nn.RNNCellBase):
            hint = (f" ({type(module).__name__} is a single cell: build the equivalent "
                    "nn.RNN/nn.LSTM/nn.GRU with num_layers=1 and copy its weights)")
        raise TypeError(f"{where}: module must be a torch.nn.RNN, nn.LSTM or nn.GRU, got "
                        f"{type(module).__module__}.{type(module).__name__}{hint}")
    mode = module.mode
    if mode == "RNN_RELU":
        raise ValueError(f"{where}: nn.RNN with nonlinearity='relu' is not supported: "
                         "jaxbptt's RNN cell is tanh (build it with nonlinearity='tanh')")
    if mode not in _TORCH_KINDS:
        raise TypeError(f"{where}: unsupported recurrent mode {mode!r} of "
                        f"{type(module).__name__}; supported: nn.RNN (tanh), nn.LSTM, nn.GRU")
    if getattr(module, "proj_size", 0) > 0:
        raise ValueError(f"{where}: nn.LSTM with proj_size={module.proj_size} > 0 is not "
                         "supported: jaxbptt's LSTM has no projection of the hidden state "
                         "(build it with proj_size=0)")
    if module.batch_first:
        raise ValueError(f"{where}: batch_first=True is not supported: jaxbptt is time-major "
                         "(jb.stack takes xs as (T, B, n_x), PyTorch's batch_first=False "
                         "layout; jb.rnn/lstm/gru also accept time_major=False). Build the "
                         "module with batch_first=False (its weights are the same: "
                         "load_state_dict from this one) and transpose xs")
    dtypes = {p.dtype for p in module.parameters()}
    if len(dtypes) != 1:
        raise TypeError(f"{where}: the module mixes parameter dtypes {sorted(map(str, dtypes))}")
    dtype = dtypes.pop()
    if dtype not in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        raise TypeError(f"{where}: parameters of dtype {dtype} are not supported (bfloat16, "
                        "float16, float32 or float64; convert the module, e.g. "
                        "module.float())")
    D = 2 if module.bidirectional else 1
    return (mode, module.num_layers, D, module.input_size, module.hidden_size,
            bool(module.bias), dtype)


def _np(tensor):
    """A private NumPy copy of a tensor (never aliasing torch's memory); bfloat16, which
    NumPy lacks, goes through float32 (exactly) to ml_dtypes' bfloat16."""
    import torch

    t = tensor.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(jnp.bfloat16)
    return np.array(t.numpy(), copy=True)


def _np_dtype(torch_dtype):
    import torch

    if torch_dtype == torch.bfloat16:
        return np.dtype(jnp.bfloat16)
    return torch.empty((), dtype=torch_dtype).numpy().dtype


def _cell_from_torch(mode, w_ih, w_hh, b_ih, b_hh):
    """jaxbptt params (NumPy) from one direction's torch weights (NumPy)."""
    if mode == "RNN_TANH":
        return RNNParams(Wax=w_ih, Waa=w_hh, ba=b_ih + b_hh)
    W = np.concatenate([w_hh, w_ih], axis=1)  # acts on [a_prev; x]
    if mode == "LSTM":
        Wi, Wf, Wc, Wo = np.split(W, 4)
        bi, bf, bc, bo = np.split(b_ih + b_hh, 4)
        return LSTMParams(Wf=Wf, bf=bf, Wi=Wi, bi=bi, Wc=Wc, bc=bc, Wo=Wo, bo=bo)
    Wr, Wz, Wn = np.split(W, 3)
    b_ir, b_iz, b_in = np.split(b_ih, 3)
    b_hr, b_hz, b_hn = np.split(b_hh, 3)
    return GRUParams(Wu=-Wz, bu=-(b_iz + b_hz), Wr=Wr, br=b_ir + b_hr, Wc=Wn, bc=b_in,
                     bch=b_hn)


def _cell_to_torch(mode, p, n_a, b_hh):
    """(w_ih, w_hh, b_ih, b_hh) (NumPy) from jaxbptt params (NumPy), keeping ``b_hh``."""
    if mode == "RNN_TANH":
        return p.Wax, p.Waa, p.ba - b_hh, b_hh
    if mode == "LSTM":
        W = np.concatenate([p.Wi, p.Wf, p.Wc, p.Wo])
        b = np.concatenate([p.bi, p.bf, p.bc, p.bo])
        return W[:, n_a:], W[:, :n_a], b - b_hh, b_hh
    W = np.concatenate([p.Wr, -p.Wu, p.Wc])
    b_hr, b_hz, _ = np.split(b_hh, 3)
    b_ih = np.concatenate([p.br - b_hr, -p.bu - b_hz, p.bc])
    return W[:, n_a:], W[:, :n_a], b_ih, np.concatenate([b_hr, b_hz, p.bch])


def _layer(params):
    return Bidirectional(*params) if len(params) == 2 else params[0]


def from_torch(module):
    """The ``layers`` of `jaxbptt.stack` equivalent to a PyTorch recurrent module.

    ``jb.stack(from_torch(m), xs, init, lengths=lengths)`` computes what
    ``m(pack_padded_sequence(xs, lengths, enforce_sorted=False), init)`` does
    (``init`` as torch's ``h_0``, or ``LSTMState(h_0, c_0)``; outputs zero past
    each length). ``m.dropout`` is a training-time option, not a weight: pass
    ``dropout=`` (and ``key=``) to `jaxbptt.stack` to use it.

    Args:
      module: a ``torch.nn.RNN`` (``nonlinearity="tanh"``), ``torch.nn.LSTM``
        (``proj_size=0``) or ``torch.nn.GRU`` with ``batch_first=False``; any
        ``num_layers``, ``bidirectional`` and ``bias``; bfloat16, float16/32/64.

    Returns:
      A tuple with one entry per layer: `RNNParams`, `LSTMParams` or `GRUParams`
      (the ``"cudnn"`` variant), or `Bidirectional` ``(fwd, bwd)`` of them for a
      bidirectional module (``bwd`` from the ``*_reverse`` weights). Leaves are
      JAX arrays of the module's dtype, copies detached from the module; a
      module without biases gives zero biases (and a zero ``bch``), so modules
      of the same architecture give the same pytree structure.

    Raises:
      TypeError: ``module`` is not an ``nn.RNN``/``nn.LSTM``/``nn.GRU``, or has an
        unsupported dtype.
      ValueError: ``nonlinearity="relu"``, ``proj_size > 0``,
        ``batch_first=True``, or float64 weights with JAX's 64-bit mode off.
    """
    mode, L, D, _, n_a, bias, dtype = _torch_arch(module, "from_torch")
    np_dtype = _np(next(module.parameters())).dtype
    if jax.dtypes.canonicalize_dtype(np_dtype) != np_dtype:
        raise ValueError(f"from_torch: the module is {np_dtype} but JAX's 64-bit mode is off, "
                         "so JAX arrays cannot hold it: enable it "
                         "(jax.config.update('jax_enable_x64', True)) or convert the module "
                         "(module.float())")
    layers = []
    for l in range(L):
        dirs = []
        for sfx in _SUFFIXES[:D]:
            w_ih = _np(getattr(module, f"weight_ih_l{l}{sfx}"))
            w_hh = _np(getattr(module, f"weight_hh_l{l}{sfx}"))
            if bias:
                b_ih = _np(getattr(module, f"bias_ih_l{l}{sfx}"))
                b_hh = _np(getattr(module, f"bias_hh_l{l}{sfx}"))
            else:
                b_ih = b_hh = np.zeros((_N_GATES[mode] * n_a,), np_dtype)
            p = _cell_from_torch(mode, w_ih, w_hh, b_ih, b_hh)
            dirs.append(jax.tree.map(lambda x: jnp.asarray(x, dtype=np_dtype), p))
        layers.append(_layer(dirs))
    return tuple(layers)


def _check_layers(layers, mode, L, D, n_x, n_a):
    """Checks ``layers`` against the module's architecture; clear errors naming the field."""
    kind = _TORCH_KINDS[mode]
    torch_name = _TORCH_NAMES[mode]
    if (not isinstance(layers, (tuple, list))
            or isinstance(layers, (RNNParams, LSTMParams, GRUParams, Bidirectional))):
        raise TypeError(f"to_torch: layers must be a tuple with one entry per layer (as "
                        f"from_torch returns), got {type(layers).__name__}"
                        + (" (wrap a single layer as (params,))"
                           if isinstance(layers, tuple) else ""))
    if len(layers) != L:
        raise ValueError(f"to_torch: {len(layers)} layers but the {torch_name} has "
                         f"num_layers={L}")
    for l, layer in enumerate(layers):
        is_bi = isinstance(layer, Bidirectional)
        if is_bi != (D == 2):
            raise ValueError(
                f"to_torch: layer {l} is {'' if is_bi else 'not '}Bidirectional but the "
                f"{torch_name} has bidirectional={D == 2}")
        dirs = tuple(layer) if is_bi else (layer,)
        for d, p in enumerate(dirs):
            where = f"layer {l}" + (f" ({('fwd', 'bwd')[d]})" if D == 2 else "")
            if type(p) is not kind:
                raise TypeError(f"to_torch: {where} holds {type(p).__name__} but the module is "
                                f"an {torch_name}, which needs {kind.__name__}")
            if kind is GRUParams and p.bch is None:
                raise ValueError(
                    f"to_torch: {where} is a 'course' GRU (bch is None); torch's nn.GRU is "
                    "the 'cudnn' variant (reset after the hidden product, with its bias bch)")
            n_in = n_x if l == 0 else D * n_a
            expected = {f: ((n_a, n_in) if f == "Wax" else (n_a, n_a) if f == "Waa"
                            else (n_a, n_a + n_in) if f[0] == "W" else (n_a,))
                        for f in kind._fields}
            for field, shape in expected.items():
                got, dt = _checks.shape_dtype(f"to_torch: {where} {kind.__name__}.{field}",
                                              getattr(p, field))
                if not jnp.issubdtype(dt, jnp.floating):
                    raise TypeError(f"to_torch: {where} {kind.__name__}.{field} is {dt}: "
                                    f"the params must be floating")
                if got != shape:
                    raise ValueError(
                        f"to_torch: {where} {kind.__name__}.{field} has shape {got}, expected "
                        f"{shape} for the {torch_name} (input_size={n_x}, "
                        f"hidden_size={n_a}, layer {l} takes {n_in} inputs)")


def to_torch(layers, module):
    """Writes jaxbptt ``layers`` into an existing PyTorch module, in place.

    The inverse of `from_torch`: ``from_torch(to_torch(layers, m))`` equals
    ``layers``, and ``to_torch(from_torch(m), m)`` leaves ``m``'s weights
    bit-identical. torch keeps two biases per gate (``bias_ih``, ``bias_hh``)
    where jaxbptt keeps their sum, so the module's current ``bias_hh`` is kept
    and ``bias_ih = ours - bias_hh`` is written (the GRU's n rows are written
    exactly, ``b_in = bc`` and ``b_hn = bch``); both directions of the round trip
    hold for the biases up to float round-off. Values are cast to the module's
    dtype and device.

    Args:
      layers: a tuple as returned by `from_torch`, one entry per layer: cell
        params, or `Bidirectional` pairs for a bidirectional module. Concrete
        arrays (not traced).
      module: a ``torch.nn.RNN`` (tanh), ``nn.LSTM`` or ``nn.GRU`` of the same
        architecture (cell, ``num_layers``, ``bidirectional``, ``input_size``,
        ``hidden_size``); with ``bias=False`` every bias in ``layers`` must be zero.

    Returns:
      ``module``, its parameters overwritten (under ``torch.no_grad()``).

    Raises:
      TypeError: an unsupported module (as `from_torch`), or params of the wrong
        cell type.
      ValueError: the architectures differ (number of layers, directions,
        shapes, a 'course' GRU), or nonzero biases for a ``bias=False`` module.
    """
    mode, L, D, n_x, n_a, bias, dtype = _torch_arch(module, "to_torch")
    import torch  # (_torch_arch has found it)

    _check_layers(layers, mode, L, D, n_x, n_a)
    np_dtype = _np_dtype(dtype)
    updates = {}
    for l, layer in enumerate(layers):
        dirs = tuple(layer) if isinstance(layer, Bidirectional) else (layer,)
        for sfx, p in zip(_SUFFIXES, dirs):
            p = jax.tree.map(lambda x: np.asarray(x).astype(np_dtype), p)
            names = [f"{w}_l{l}{sfx}" for w in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
            if bias:
                b_hh = _np(getattr(module, names[3]))
            else:
                b_hh = np.zeros((_N_GATES[mode] * n_a,), np_dtype)
                for field in p._fields:
                    if field[0] == "b" and np.any(getattr(p, field) != 0):
                        raise ValueError(
                            f"to_torch: the module has bias=False but layer {l}"
                            f"{' (bwd)' if sfx else ''} has a nonzero {field}")
            arrays = _cell_to_torch(mode, p, n_a, b_hh)
            updates.update(zip(names[:4] if bias else names[:2], arrays))
    with torch.no_grad():
        for name, value in updates.items():
            param = getattr(module, name)
            if value.dtype == jnp.bfloat16:  # torch reads no NumPy bfloat16: via float32
                value = value.astype(np.float32)
            param.copy_(torch.from_numpy(np.ascontiguousarray(value)).to(param.device,
                                                                         param.dtype))
    return module


# --- Flax ------------------------------------------------------------------------------

_FLAX_KINDS = ("LSTMCell", "OptimizedLSTMCell", "GRUCell", "SimpleCell")

# Each kind's Dense layers: name -> (input "i" or hidden "h", has a bias).
_LSTM_DENSE = {f"{s}{g}": (s, s == "h") for g in "ifgo" for s in "ih"}
_FLAX_DENSE = {
    "LSTMCell": _LSTM_DENSE,
    "OptimizedLSTMCell": _LSTM_DENSE,
    "GRUCell": {"ir": ("i", True), "iz": ("i", True), "in": ("i", True),
                "hr": ("h", False), "hz": ("h", False), "hn": ("h", True)},
    "SimpleCell": {"i": ("i", True), "h": ("h", False)},
}


def _flax_cell(cell, where):
    """(kind, residual, features or None) for a flax cell, an nn.RNN of one, or a kind name."""
    if isinstance(cell, str):
        if cell not in _FLAX_KINDS:
            raise ValueError(f"{where}: cell must be a flax.linen cell or one of {_FLAX_KINDS}, "
                             f"got {cell!r}")
        return cell, False, None
    nn = _require("flax.linen", where, "pip install 'jaxbptt[interop]'")

    if isinstance(cell, nn.RNN):
        cell = cell.cell
    kind = next((k for k in _FLAX_KINDS if isinstance(cell, getattr(nn, k))), None)
    if kind is None:
        raise TypeError(f"{where}: unsupported flax cell {type(cell).__name__}; supported: "
                        f"{', '.join(_FLAX_KINDS)} (with their default activations)")
    if cell.activation_fn is not jnp.tanh:
        raise ValueError(f"{where}: {kind} with activation_fn={cell.activation_fn!r} is not "
                         "supported: jaxbptt's cells use tanh (flax's default)")
    if kind != "SimpleCell" and cell.gate_fn is not jax.nn.sigmoid:
        raise ValueError(f"{where}: {kind} with gate_fn={cell.gate_fn!r} is not supported: "
                         "jaxbptt's gates are sigmoids (flax's default)")
    return kind, bool(getattr(cell, "residual", False)), cell.features


def _cell_params(variables, kind, where):
    """The cell's own params dict from variables / params / an nn.RNN's, with checked keys."""
    p = variables
    if isinstance(p, Mapping) and "params" in p:
        p = p["params"]
    if isinstance(p, Mapping) and set(p) == {"cell"}:
        p = p["cell"]  # flax.linen.RNN(cell) keeps the cell's params under "cell"
    if not isinstance(p, Mapping):
        raise TypeError(f"{where}: expected flax variables or params (a dict), got "
                        f"{type(variables).__name__}")
    dense = _FLAX_DENSE[kind]
    if set(p) != set(dense):
        raise ValueError(f"{where}: {kind} params must have the Dense layers "
                         f"{sorted(dense)}, got {sorted(p)}")
    for name, (_, has_bias) in dense.items():
        want = {"kernel", "bias"} if has_bias else {"kernel"}
        if not isinstance(p[name], Mapping) or set(p[name]) != want:
            got = sorted(p[name]) if isinstance(p[name], Mapping) else type(p[name]).__name__
            raise ValueError(f"{where}: {kind} params[{name!r}] must hold {sorted(want)}, "
                             f"got {got}")
    return p


def _check_flax_shapes(p, kind, features, where):
    """(n_x, n_a) from the kernels, every shape checked."""
    dense = _FLAX_DENSE[kind]
    dtypes = {}
    for name, (_, has_bias) in dense.items():  # ranks and dtypes first: sizes read below
        for leaf, rank in (("kernel", 2), ("bias", 1))[:1 + has_bias]:
            at = f"{where}: {kind} params[{name!r}][{leaf!r}]"
            shape, dtypes[at] = _checks.shape_dtype(at, p[name][leaf])
            if len(shape) != rank:
                raise ValueError(f"{at} has shape {shape}, expected rank {rank}")
            if not jnp.issubdtype(dtypes[at], jnp.floating):
                raise TypeError(f"{at} is {dtypes[at]}: the params must be floating")
    common = max(set(dtypes.values()), key=list(dtypes.values()).count)
    odd = next((at for at, dt in dtypes.items() if dt != common), None)
    if odd is not None:
        raise TypeError(f"{odd} is {dtypes[odd]} but the other params are {common}")
    h_name = next(n for n, (s, _) in dense.items() if s == "h")
    i_name = next(n for n, (s, _) in dense.items() if s == "i")
    n_a = np.shape(p[h_name]["kernel"])[-1]
    n_x = np.shape(p[i_name]["kernel"])[0]
    for name, (side, has_bias) in dense.items():
        want = {"kernel": (n_a if side == "h" else n_x, n_a)}
        if has_bias:
            want["bias"] = (n_a,)
        for leaf, shape in want.items():
            got = tuple(np.shape(p[name][leaf]))
            if got != shape:
                raise ValueError(f"{where}: {kind} params[{name!r}][{leaf!r}] has shape {got}, "
                                 f"expected {shape} (n_x={n_x}, n_a={n_a})")
    if features is not None and features != n_a:
        raise ValueError(f"{where}: the cell has features={features} but its params have "
                         f"n_a={n_a}")
    return n_x, n_a


def from_flax(variables, cell):
    """jaxbptt params equivalent to a ``flax.linen`` recurrent cell's.

    Works on traced arrays (it is a linear map written in jnp), so gradients
    with respect to the flax params flow through it.

    Args:
      variables: the cell's variables (``{"params": ...}``), its params dict,
        or the variables/params of a ``flax.linen.RNN`` wrapping the cell
        (params under ``"cell"``).
      cell: the flax cell: an ``nn.LSTMCell``, ``nn.OptimizedLSTMCell``,
        ``nn.GRUCell`` or ``nn.SimpleCell`` instance (default tanh/sigmoid
        activations; SimpleCell's ``residual=True`` is folded into ``Waa`` as
        ``+ I``), an ``nn.RNN`` wrapping one, or the class name as a string
        (then the defaults are assumed).

    Returns:
      `LSTMParams`, `GRUParams` (``"cudnn"`` variant) or `RNNParams` in the
      params' dtype, for `jaxbptt.lstm`, `gru` or `rnn`. Flax's LSTM carry is
      ``(c, h)``: pass ``LSTMState(a=h, c=c)``. jaxbptt computes in the
      params' dtype (a flax ``dtype=`` for the computation has no equivalent).

    Raises:
      TypeError: an unsupported cell (e.g. ``MGUCell``) or non-dict variables.
      ValueError: a non-default activation, missing or unexpected params,
        wrong shapes, or ``features`` that disagree with the params.
    """
    kind, residual, features = _flax_cell(cell, "from_flax")
    p = _cell_params(variables, kind, "from_flax")
    _, n_a = _check_flax_shapes(p, kind, features, "from_flax")
    p = jax.tree.map(jnp.asarray, p)

    def W(gate):  # (n_a, n_a + n_x), acting on [a_prev; x]
        return jnp.concatenate([p["h" + gate]["kernel"].T, p["i" + gate]["kernel"].T], axis=1)

    if kind == "SimpleCell":
        Waa = p["h"]["kernel"].T
        if residual:
            Waa = Waa + jnp.eye(n_a, dtype=Waa.dtype)
        return RNNParams(Wax=p["i"]["kernel"].T, Waa=Waa, ba=p["i"]["bias"])
    if kind == "GRUCell":
        return GRUParams(Wu=-W("z"), bu=-p["iz"]["bias"], Wr=W("r"), br=p["ir"]["bias"],
                         Wc=W("n"), bc=p["in"]["bias"], bch=p["hn"]["bias"])
    return LSTMParams(Wf=W("f"), bf=p["hf"]["bias"], Wi=W("i"), bi=p["hi"]["bias"],
                      Wc=W("g"), bc=p["hg"]["bias"], Wo=W("o"), bo=p["ho"]["bias"])


def to_flax(params, cell):
    """Flax variables for a cell equivalent to jaxbptt ``params`` (inverse of `from_flax`).

    ``from_flax(to_flax(p, cell), cell)`` equals ``p`` exactly (up to round-off
    in ``Waa``'s diagonal for a residual SimpleCell).

    Args:
      params: `LSTMParams` (for LSTMCell / OptimizedLSTMCell), `GRUParams` of the
        ``"cudnn"`` variant (GRUCell) or `RNNParams` (SimpleCell).
      cell: as for `from_flax`.

    Returns:
      ``{"params": {...}}`` for ``cell.apply``; for a ``flax.linen.RNN`` wrapping
      the cell use ``{"params": {"cell": to_flax(params, cell)["params"]}}``.

    Raises:
      TypeError: params of the wrong type for the cell, or an unsupported cell.
      ValueError: a 'course' GRU, a non-default activation, or ``features``
        that disagree with the params.
    """
    kind, residual, features = _flax_cell(cell, "to_flax")
    want = {"SimpleCell": RNNParams, "GRUCell": GRUParams}.get(kind, LSTMParams)
    if type(params) is not want:
        raise TypeError(f"to_flax: a {kind} needs {want.__name__}, got {type(params).__name__}")
    if want is GRUParams and params.bch is None:
        raise ValueError("to_flax: flax's GRUCell is the 'cudnn' variant, these GRUParams are "
                         "'course' (bch is None)")
    try:
        n_a = _checks.params(params, memory.cell_of(params)[1])[0]
    except (TypeError, ValueError) as e:
        raise type(e)(f"to_flax: {e}") from e
    if features is not None and features != n_a:
        raise ValueError(f"to_flax: the cell has features={features} but the params have "
                         f"n_a={n_a}")
    if kind == "SimpleCell":
        Waa = params.Waa - jnp.eye(n_a, dtype=params.Waa.dtype) if residual else params.Waa
        return {"params": {"i": {"kernel": params.Wax.T, "bias": params.ba},
                           "h": {"kernel": Waa.T}}}
    if kind == "GRUCell":
        gates = {"r": (params.Wr, params.br), "z": (-params.Wu, -params.bu),
                 "n": (params.Wc, params.bc)}
    else:
        gates = {"i": (params.Wi, params.bi), "f": (params.Wf, params.bf),
                 "g": (params.Wc, params.bc), "o": (params.Wo, params.bo)}
    out = {}
    for g, (W, b) in gates.items():
        if kind == "GRUCell":  # input Dense layers carry the biases, and hn its own
            out["i" + g] = {"kernel": W[:, n_a:].T, "bias": b}
            out["h" + g] = {"kernel": W[:, :n_a].T}
        else:  # LSTM: hidden Dense layers carry the biases
            out["i" + g] = {"kernel": W[:, n_a:].T}
            out["h" + g] = {"kernel": W[:, :n_a].T, "bias": b}
    if kind == "GRUCell":
        out["hn"]["bias"] = params.bch
    return {"params": out}
