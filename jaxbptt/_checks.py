"""Input validation, run at trace time so that errors name the offending shapes.

Shapes are static under ``jit``, so every check here raises while tracing, before
XLA sees anything: a clear ``ValueError`` (shapes, ranks) or ``TypeError``
(dtypes) instead of a broadcast that silently does the wrong thing.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np


def kind_of(x):
    """What ``x`` is, for a message: ``an array float32(2, 4)`` for an array (or a tracer,
    as every call's arrays are under jit), else its type's name."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"an array {x.dtype}{tuple(x.shape)}"
    return type(x).__name__


def shape_dtype(where, x):
    """``(shape, dtype)`` of an array, or a TypeError naming ``where``. The dtype is the
    one JAX computes in: a NumPy float64 is float32 when x64 is off, as under jit."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(f"{where} must be an array, got {kind_of(x)}")
    try:
        is_key = jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        dtype = None if is_key else jax.dtypes.canonicalize_dtype(np.dtype(x.dtype))
    except TypeError:  # e.g. a torch.Tensor, whose dtype NumPy does not know
        kind = f"{type(x).__module__}.{type(x).__name__}"
        hint = (" (convert it first, e.g. jnp.asarray(t.detach().cpu().float().numpy()))"
                if kind.startswith("torch.") else "")
        raise TypeError(f"{where} must be a JAX or NumPy array, got a {kind} of dtype "
                        f"{x.dtype}{hint}") from None
    if is_key:
        raise TypeError(f"{where} is an array of PRNG keys ({x.dtype}), expected numbers")
    return tuple(x.shape), dtype


def _float(where, dtype):
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{where} must have a floating dtype, got {dtype}")


def params_type(p, cls, make):
    """``p`` must be a ``cls`` (the NamedTuple a sequence function takes)."""
    if not isinstance(p, cls):
        raise TypeError(f"params must be {cls.__name__} (e.g. from {make}), got "
                        f"{kind_of(p)}")


def params(p, spec):
    """Checks the NamedTuple ``p`` against ``spec`` and returns ``(n_a, n_x, dtype)``.

    ``spec`` maps each field to its dims, each one of ``"n_a"``, ``"n_x"`` or
    ``"n_a+n_x"``. n_a and n_x are the sizes most fields agree on (the first field
    breaks a tie), so that the field that disagrees is the one named; every field
    must then match them, with one float dtype.
    """
    kind = type(p).__name__
    shapes = {}
    for field, dims in spec.items():
        where = f"{kind}.{field}"
        shape, dtype = shape_dtype(where, getattr(p, field))
        if len(shape) != len(dims):
            raise ValueError(
                f"{where} must have rank {len(dims)} with shape ({', '.join(dims)}), "
                f"got shape {shape}")
        _float(where, dtype)
        if dims == ("n_a", "n_a+n_x") and shape[1] <= shape[0]:
            why = "is it transposed?" if shape[1] < shape[0] else "none for the inputs"
            raise ValueError(
                f"{where} has shape {shape}, expected (n_a, n_a+n_x) with n_x >= 1: a weight "
                f"acting on [a<t-1>; x<t>] has more columns than rows ({why})")
        shapes[field] = (shape, dtype)

    def most_common(votes):  # Counter keeps first-seen order among equal counts
        return collections.Counter(votes).most_common(1)[0][0] if votes else None

    def sizes_from(fields):
        """n_a and n_x as most of ``fields`` give them (None for one that none gives)."""
        pairs = [(size, dim) for f in fields for size, dim in zip(shapes[f][0], spec[f])]
        n_a = most_common([size for size, dim in pairs if dim == "n_a"])
        n_x = most_common([size if dim == "n_x" else size - n_a for size, dim in pairs
                           if dim == "n_x" or (dim == "n_a+n_x" and n_a is not None)])
        return n_a, n_x

    n_a, n_x = sizes_from(spec)
    if n_a == 0:
        raise ValueError(f"{kind}: the hidden size n_a must be >= 1, got shapes "
                         f"{ {f: s for f, (s, _) in shapes.items()} }")
    if n_x is None or n_x < 1:
        raise ValueError(f"{kind}: cannot read an input size n_x >= 1 from shapes "
                         f"{ {f: s for f, (s, _) in shapes.items()} } with n_a={n_a}")
    sizes = {"n_a": n_a, "n_x": n_x, "n_a+n_x": n_a + n_x}
    dtype = most_common([dt for _, dt in shapes.values()])
    for field, dims in spec.items():
        shape, dt = shapes[field]
        if shape != tuple(sizes[d] for d in dims):
            # The sizes as the other fields give them; one that only this field gives (the
            # RNN's n_x, from Wax alone) is left as its name, not read from the bad shape.
            o_a, o_x = sizes_from([f for f in spec if f != field])
            known = {"n_a": o_a, "n_x": o_x,
                     "n_a+n_x": None if None in (o_a, o_x) else o_a + o_x}
            expected = ", ".join(d if known[d] is None else str(known[d]) for d in dims)
            expected += "," if len(dims) == 1 else ""
            given = " and ".join(f"{d}={v}" for d, v in (("n_a", o_a), ("n_x", o_x))
                                 if v is not None)
            others = ", ".join(f"{f} {s}" for f, (s, _) in shapes.items() if f != field)
            raise ValueError(
                f"{kind}.{field} has shape {shape}, expected ({expected}) = "
                f"({', '.join(dims)}) with {given}, the sizes of the "
                f"other fields ({others})")
        if dt != dtype:
            raise TypeError(f"{kind} mixes dtypes: {kind}.{field} is {dt} but the "
                            f"other fields are {dtype}")
    return n_a, n_x, dtype


def sequence(xs, n_x, dtype, time_major=True):
    """Checks ``xs`` is (T, B, n_x) with T >= 1 and ``dtype``; returns ``(T, B)``.

    With ``time_major=False`` xs has been swapped from the caller's (B, T, n_x), and
    the messages show the shapes as the caller gave them."""
    shape, dt = shape_dtype("xs", xs)
    if len(shape) != 3:
        raise ValueError(f"xs must have rank 3 with shape (T, B, n_x), got shape {shape}"
                         " (batch a single sequence as xs[:, None])")
    _float("xs", dt)
    T, B, nx = shape
    given, layout = (shape, "(T, B, {})") if time_major else ((B, T, nx), "(B, T, {})")
    if T < 1:
        raise ValueError(f"xs must hold at least one time step, got shape {given}")
    if nx != n_x:
        raise ValueError(f"xs has shape {given} but the params expect n_x={n_x} "
                         f"inputs: xs must be {layout.format(n_x)}")
    if dt != dtype:
        raise TypeError(f"xs is {dt} but the params are {dtype}; cast one of them")
    return T, B


def state(where, x, B, n_a, dtype):
    """Checks an initial state ``x`` is (B, n_a) of ``dtype``."""
    shape, dt = shape_dtype(where, x)
    if shape != (B, n_a):
        raise ValueError(f"{where} has shape {shape}, expected (B, n_a) = ({B}, {n_a}) "
                         f"from xs's batch size B={B} and the params' n_a={n_a}")
    _float(where, dt)
    if dt != dtype:
        raise TypeError(f"{where} is {dt} but the params are {dtype}; cast one of them")


def static(name, x, kind):
    """A TypeError if ``x`` is traced: options that shape the program are static under jit."""
    if isinstance(x, jax.core.Tracer):
        raise TypeError(f"{name} must be a Python {kind}, static under jit, got a traced value: "
                        f"mark it static, e.g. jax.jit(f, static_argnames=('{name}',))")


def flag(name, x):
    """A static bool option (``reverse``, ``time_major``), or a TypeError."""
    static(name, x, "bool")
    if not (isinstance(x, (bool, np.bool_)) or (
            hasattr(x, "dtype") and np.shape(x) == () and np.dtype(x.dtype) == np.bool_)):
        raise TypeError(f"{name} must be a bool, got {x!r}")
    return bool(x)


def backward_mode(backward):
    if backward not in ("bptt", "autodiff"):
        raise ValueError(f"backward must be 'bptt' or 'autodiff', got {backward!r}")


def time_major(xs, is_time_major):
    """xs as (T, B, n_x); batch-major input (B, T, n_x) is swapped."""
    if is_time_major:
        return xs
    shape, _ = shape_dtype("xs", xs)
    if len(shape) != 3:
        raise ValueError(f"xs must have rank 3 with shape (B, T, n_x) when time_major=False, "
                         f"got shape {shape}")
    return jnp.swapaxes(xs, 0, 1)


def lengths(x, B, T):
    """``None``, or int lengths of shape (B,), returned clipped to [0, T]: a length
    past T means T (the padding of the last chunk is never a valid step)."""
    if x is None:
        return None
    shape, dtype = shape_dtype("lengths", x)  # (a list is an array by now: `_driver.run`)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"lengths must be integers, got {dtype}")
    if shape != (B,):
        raise ValueError(f"lengths has shape {shape}, expected (B,) = ({B},) from xs")
    if jnp.iinfo(dtype).max < T:  # a narrow type that cannot hold T
        x = x.astype(jnp.int32)
    return jnp.clip(x, 0, T).astype(jnp.int32)


_SIZES = {"n_x": "the input size", "n_a": "the hidden size", "n_y": "the number of classes"}


def sizes(**named):
    """``init_*``'s sizes, in the order given, as ints: positive ints, or a ValueError
    naming the one that is not."""
    return tuple(positive_int(name, n, f" ({_SIZES[name]})") for name, n in named.items())


def key(k, where="key"):
    """One PRNG key: a typed key of shape (), or the raw uint32 data of one (PRNGKey's),
    or a TypeError naming ``where``."""
    array = hasattr(k, "dtype") and hasattr(k, "shape")
    try:
        typed = array and jax.dtypes.issubdtype(k.dtype, jax.dtypes.prng_key)
        raw = array and not typed and np.dtype(k.dtype) == np.uint32 and len(k.shape) == 1
    except TypeError:  # a dtype NumPy does not know (a torch.Tensor's)
        typed = raw = False
    if typed:
        ok = k.shape == ()
    elif raw:
        try:  # the default implementation's key shape, e.g. (2,) for threefry
            jax.random.wrap_key_data(k)
            ok = True
        except TypeError:
            ok = False
    else:
        ok = False
    if not ok:
        got = kind_of(k) if array else f"{type(k).__name__} {k!r}"
        raise TypeError(f"{where} must be one PRNG key, e.g. jax.random.key(0) or "
                        f"jax.random.PRNGKey(0), got {got}")


def key_and_dtype(k, dtype):
    """``init_*``'s PRNG key and parameter dtype: the dtype, or a TypeError naming the
    argument that is not a key or not a floating dtype."""
    key(k)
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        raise TypeError("dtype must be a floating dtype (float32, float64, bfloat16, float16), "
                        f"got {repr(dtype) if dt is None else dt}")
    return dt


def _real(dtype):
    """A float (bfloat16 included), int or bool dtype: not complex, not a string."""
    return jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer) or (
        dtype == np.bool_)


def finite(name, x, n):
    """A real number, or ``n`` of them, finite (its values checked unless traced), or a
    ValueError."""
    message = f"{name} must be a finite number (or {n} of them), got "
    if isinstance(x, jax.core.Tracer):
        shape, dtype = shape_dtype(name, x)
        if not _real(dtype) or shape not in ((), (1,), (n,)):
            raise ValueError(message + f"a traced {dtype}{shape}")
        return
    try:
        values = np.asarray(x)
    except (TypeError, ValueError):
        values = None
    if (values is None or not _real(values.dtype) or values.shape not in ((), (1,), (n,))
            or not np.all(np.isfinite(values.astype(np.float64)))):
        raise ValueError(message + repr(x))


def positive_int(name, k, accepted=""):
    """A positive Python or NumPy int (not a bool) as an int, or a ValueError (a
    TypeError if traced)."""
    static(name, k, "int")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"{name} must be a positive int{accepted}, got {k!r}")
    return int(k)


def _static_steps(name, k):
    """``None`` or a positive int (a static number of steps)."""
    if k is None:
        return None
    return positive_int(name, k, " (a static number of steps) or None")


def truncate(k):
    return _static_steps("truncate", k)


def chunk(k, residuals):
    """``None``, a positive int, or (``"checkpoint"`` only) a tuple of them, outermost
    first, each dividing the one before: the chunk sizes of nested checkpointing."""
    if isinstance(k, list):
        raise ValueError(f"nested chunk sizes are a tuple, got the list {k!r}: "
                         f"chunk={tuple(k)!r}")
    if not isinstance(k, tuple):
        return _static_steps("chunk", k)
    if not k:
        raise ValueError("chunk=() holds no chunk size: give an int, or a tuple of nested "
                         "sizes with residuals='checkpoint'")
    if residuals != "checkpoint":
        raise ValueError(f"a tuple chunk= (nested chunk sizes) needs residuals='checkpoint', "
                         f"got chunk={k!r} with residuals={residuals!r}")
    sizes = tuple(_static_steps("chunk", x) for x in k)
    for outer, inner in zip(sizes, sizes[1:]):
        if inner is None or outer is None or outer % inner:
            raise ValueError(f"nested chunk sizes must each divide the one before, got {k!r}")
    return sizes


def slots(m, residuals, chunk):
    """``None``, or a positive int with ``"checkpoint"`` and one chunk size: how many
    chunk starts may be kept at once (the initial state among them)."""
    if m is None:
        return None
    if residuals != "checkpoint" or isinstance(chunk, tuple):
        raise ValueError(f"slots= needs residuals='checkpoint' and an int (or default) chunk=, "
                         f"got slots={m!r} with residuals={residuals!r}, chunk={chunk!r}")
    return positive_int("slots", m, " (a static number of chunk starts) or None")


def probe(p, state0, T):
    """A probe is shaped like the states stacked over time: (T,) + each state's shape."""
    want = jax.tree.map(lambda s: (T,) + tuple(s.shape), state0)
    got = jax.tree.map(lambda x: shape_dtype("probe", x)[0], p)
    if jax.tree.structure(p) != jax.tree.structure(state0) or got != want:
        raise ValueError(f"probe must be shaped like the states over time, {want}, got {got}")
    dtypes = {str(np.dtype(x.dtype)) for x in jax.tree.leaves((p, state0))}
    if len(dtypes) > 1:
        raise TypeError(f"probe must have the states' dtype, got {sorted(dtypes)}")

