"""The generic BPTT driver: one ``jax.custom_vjp`` over ``lax.scan`` serving every cell.

A cell is a small static object (see ``rnn.py``, ``lstm.py``, ``gru.py``) supplying

``fuse(params) -> f`` / ``unfuse(params, df) -> dparams``
    the weights as the loops use them (gates stacked; hidden and input halves
    apart), and the map of their gradient back to the params.
``project(f, xs) -> zx``
    the input projections ``W_x x<t> + b`` of a block of steps: one matmul.
``gates(f, a_prev, zx_t) -> res_t``
    every matmul of a step: what the backward needs beyond the states (the gate
    activations), from the previous output. Written on the last axis, so it also
    runs batched over (K, B, ...) blocks when the previous outputs are known.
``step(f, carry, zx_t, valid=None) -> (carry_next, res_t)``
    one forward step; rows where ``valid`` (B,) is False keep ``carry`` (`hold`). A
    `Gated` cell makes it ``replay(carry, gates(...), valid)``, where
    ``replay(prev, res_t, valid=None) -> carry_next`` is the elementwise rest of the step.
``step_bwd(f, carry_prev, carry, res_t, dcarry, dh_t) -> (dcarry_prev, dz_t)``
    the hand-derived per-step backward. ``dcarry`` is dL/d(state<t>) carried back
    from step t+1, ``dh_t`` the cotangent of the output ``hs[t]``; it returns
    dL/d(state<t-1>) and the pre-activation deltas ``dz_t`` of this step.
``chunk_grads(f, xs, carry_prevs, res, dz) -> (df, dxs)``
    weight, bias and input gradients of a block of steps as single matmuls.
``output(carry) -> a``, ``add_output(dcarry, dh)`` (dh added to the hidden part),
``zero_state(B, n_a, dtype)``, ``check_state(state, B, n_a, dtype)``.

Time is cut into chunks of K steps: an outer ``lax.scan`` over chunks and an inner
one over steps (when K does not divide T, the steps left form one shorter chunk,
run after the scan: `_Layout.segments`). Each chunk reads its inputs (and output
cotangents) in place. Its input projection, and in the backward its weight and
input gradients, are one matmul over K*B rows, so nothing of size T*B*gates is
ever materialised but what the residual policy keeps:

``"gates"``      the gate activations of every step (`Gated` cells; the RNN keeps its
                 states): the backward replays each chunk's states from the state
                 entering it, without a matmul;
``"states"``     the hidden states (outputs) of every step: each chunk's gates are
                 recomputed in the backward by one batched ``gates`` over the chunk
                 (its matmul over K*B rows), then its states replayed;
``"checkpoint"`` the state at the start of each chunk only (K ~ sqrt(T) by default,
                 Chen et al. 2016): the backward reruns each chunk's forward. Nested
                 (``chunk=(K1, K2, ...)``): the rerun of a K1 chunk keeps only the
                 states entering its K2 sub-chunks, and so on, each level's backward
                 rerunning the next (Chen et al.'s recursion, one more forward per level).
                 With ``slots=m`` < n: at most m chunk starts at once, in a buffer of
                 m + 1 (one scratch); each chunk's backward first reruns the forward
                 from a kept start to the chunk, writing the starts it passes to their
                 slots, as `slots.schedule` (Gruslys et al. 2016) says.

(`_keeps` says exactly which arrays, `Saved`, each policy keeps for a cell.)

The backward is a ``lax.scan`` over the chunks against time, each running the
cell's ``step_bwd`` over its steps: BPTT, nothing differentiated automatically.
Three options act on the loop itself, in both directions:

* ``lengths`` (B,): steps t >= lengths[b] leave row b's state unchanged and emit
  zeros; backwards they pass the state's gradient straight through and emit
  dz = 0 (padded inputs are zeroed first, so garbage or inf never reaches a sum).
* ``reverse``: the scans run from t = T-1 down to 0. With ``lengths`` each row's
  padding is met first and skipped, so every sequence is reversed within its own
  length, as PyTorch's backward direction does.
* ``truncate=k``: the state entering every k-th step of a sequence (counted from
  its first step) is cut from the gradient: ``stop_gradient`` in the forward, a
  zeroed dL/d(state) in the hand-derived backward.

A ``probe`` (time-stacked, shaped like the states, normally zeros) is a tap on the
state after every step: its values are not used (`_tap` passes the state through and
adds only the probe's tangent), and its gradient is the adjoint dL/d(state<t>) of every
step, which the reverse scan computes anyway: it is emitted at no extra cost.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxbptt import _checks
from jaxbptt import slots as _slots

POLICIES = ("gates", "states", "checkpoint")
CHUNK = 8  # steps per chunk for "gates" and "states" unless the cell says (`default_chunk`)


class Options(NamedTuple):
    """Static options of a run (hashable; part of the custom_vjp's static arguments)."""

    reverse: bool = False
    truncate: Optional[int] = None
    probe: bool = False  # whether a probe is passed (its gradient is then emitted)
    residuals: str = "gates"
    chunk: Optional[int] = None  # steps per chunk; None: the policy's default
    levels: tuple = ()  # "checkpoint" nested in chunks of these sizes (each divides the last)
    slots: Optional[int] = None  # "checkpoint" keeping at most this many chunk starts at once
    default_chunk: int = CHUNK  # the cell's K for "gates" and "states"


class Saved(NamedTuple):
    """What the forward keeps of one segment for the backward (fields a policy does not
    keep are None)."""

    states: Any = None  # (n K, ...) every state
    outputs: Any = None  # (n K, ...) every output (hidden state), unmasked
    res: Any = None  # (n K, ...) every step's residuals (gate activations)
    starts: Any = None  # (n, ...) the state entering each chunk; with slots, (m+1, ...)
    entry: Any = None  # the state entering the segment (None: the run's initial state)


def default_chunk(cell, B, n_a, dtype):
    """Steps per chunk for "gates" and "states" when ``chunk=`` is not given: the
    cell's ``chunk(B, n_a, dtype)`` if it has one, else `CHUNK`."""
    rule = getattr(cell, "chunk", None)
    return CHUNK if rule is None else rule(B, n_a, dtype)


def chunk_size(T, opts):
    """Steps per chunk: ``opts.chunk``, else the policy's K, moved to a divisor of T
    between K // 2 and 2 K when there is one (else the steps left after the last whole
    chunk run as a shorter chunk of their own: a second trace of the loops, see
    `_Layout.segments`).

    A nest's outer chunk longer than T is cut to the multiple of the next size that
    holds T (T is then padded and masked)."""
    if opts.chunk is not None:
        K = min(opts.chunk, T)
        return -(-K // opts.levels[0]) * opts.levels[0] if opts.levels else K
    K = (max(1, round(math.sqrt(T))) if opts.residuals == "checkpoint"
         else min(opts.default_chunk, T))
    near = sorted(range(max(1, K // 2), 2 * K + 1), key=lambda d: (abs(d - K), d))
    return next((d for d in near if T % d == 0), K)


class HiddenState:
    """The state handling of a cell whose carry is the hidden state a<t> alone (RNN, GRU)."""

    @staticmethod
    def output(a):
        return a

    @staticmethod
    def add_output(da, dh):
        return da + dh

    @staticmethod
    def zero_state(B, n_a, dtype):
        return jnp.zeros((B, n_a), dtype)

    @staticmethod
    def check_state(a0, B, n_a, dtype):
        _checks.state("a0", a0, B, n_a, dtype)


class Gated:
    """The step of a cell whose state follows from the previous one and the step's
    residuals without a matmul: ``step`` = ``replay`` after ``gates``.

    ``gates(f, a_prev, zx_t) -> res_t``
        the gate activations from the previous output and the input projection
        (every matmul of the step; batched over (K, B, ...) blocks as well).
    ``replay(prev, res_t, valid=None) -> state``
        the new state from the previous one and the gates (elementwise); rows
        where ``valid`` (B,) is False (past a sequence's length) keep ``prev``.

    Such a cell's policies keep no state but each chunk's first (`_keeps`).
    """

    def step(self, f, carry, zx_t, valid=None):
        res = self.gates(f, self.output(carry), zx_t)
        return self.replay(carry, res, valid), res


def affine(x, W, b):
    """x W^T + b over the last axis of x (..., n) -> (..., m), without rank promotion."""
    return x @ W.T + b.reshape((1,) * (x.ndim - 1) + b.shape)


def _row_axes(x):
    """The mesh axes ``x`` is sharded over (Explicit axes only; empty otherwise)."""
    spec = getattr(jax.typeof(x).sharding, "spec", ())
    return tuple(axis for entry in spec if entry is not None
                 for axis in (entry if isinstance(entry, tuple) else (entry,)))


def _as_rows_of(xs, state):
    """On a mesh with Explicit axes, ``state``'s (B, ...) leaves as the scan's carry must
    be laid out to run with xs (T, B, n_x): sharded as xs's batch axis, their other axes
    replicated (a no-op elsewhere, and for leaves already so)."""
    spec = tuple(getattr(jax.typeof(xs).sharding, "spec", ()))
    rows = spec[1] if len(spec) > 1 else None

    def lay_out(s):
        have = jax.typeof(s).sharding
        entries = tuple(getattr(have, "spec", ()))
        if entries[:1] in ((), (rows,)) and all(e is None for e in entries[1:]):
            return s
        mesh = (jax.typeof(xs).sharding if rows is not None else have).mesh
        return jax.reshard(s, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(rows)))
    return jax.tree.map(lay_out, state)


def _on_mesh_of(like, unreduced=()):
    """A sharding on ``like``'s mesh: replicated, or unreduced over the axes ``unreduced``."""
    spec = jax.sharding.PartitionSpec(unreduced=set(unreduced))
    return jax.sharding.NamedSharding(jax.typeof(like).sharding.mesh, spec)


def contract_rows(subscripts, *operands, unreduced=False):
    """``jnp.einsum`` summing over time and batch rows: a weight or bias gradient.

    On a mesh with Explicit axes (``jax.make_mesh``'s default) the rows may be
    sharded. The sum over them is then an all-reduce, asked for by a replicated
    result; or, with ``unreduced=True``, left as each device's partial sum (typed
    unreduced), which is how the backward accumulates its chunks and reduces once.
    """
    axes = _row_axes(operands[0])
    if not axes:
        return jnp.einsum(subscripts, *operands)
    out = _on_mesh_of(operands[0], axes if unreduced else ())
    return jnp.einsum(subscripts, *operands, out_sharding=out)


def chunk_sum(subscripts, *operands):
    """A chunk's weight or bias gradient in a cell's ``chunk_grads``: `contract_rows`
    left unreduced on sharded rows (the driver adds up the chunks, then reduces once)."""
    return contract_rows(subscripts, *operands, unreduced=True)


def _vma(x):
    """The shard_map axes ``x`` varies over (empty outside shard_map)."""
    aval = jax.typeof(x)
    manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.8
    return frozenset(manual.varying if manual is not None else getattr(aval, "vma", ()) or ())


def _match_vma(cotangents, primals):
    """Inside ``shard_map``: sum a cotangent over the mesh axes its primal does not vary on.

    A replicated (invariant) parameter used with batch-varying data gets a varying
    gradient from the hand-written backward; JAX's own autodiff would psum it (the
    transpose of the implicit ``pvary``), so the custom_vjp does too.
    """
    def fix(ct, x):
        extra = tuple(sorted(_vma(ct) - _vma(x)))
        return jax.lax.psum(ct, extra) if extra else ct
    return jax.tree.map(fix, cotangents, primals)


def varying_like(tree, like):
    """``tree`` cast to vary over every shard_map axis a leaf of ``like`` varies over
    (no-op outside shard_map): a loop's carry, which its updates make vary so."""
    axes = frozenset().union(*(_vma(x) for x in jax.tree.leaves(like)))

    def cast(t):
        missing = tuple(sorted(axes - _vma(t)))
        return jax.lax.pcast(t, missing, to="varying") if missing else t
    return jax.tree.map(cast, tree)


def _where(mask, new, old):
    """Row-wise select over a pytree of (B, ...) arrays: ``new`` where mask (B,) holds
    (or of (K, B, ...) arrays with a mask (K, B))."""
    return jax.tree.map(
        lambda n, o: jnp.where(mask.reshape(mask.shape + (1,) * (n.ndim - mask.ndim)), n, o),
        new, old)


def hold(valid, new, old):
    """``new``, but ``old`` in the rows where ``valid`` (B,) is False (a step past the
    row's length holds its state); ``new`` if valid is None (no lengths)."""
    return new if valid is None else _where(valid, new, old)


def _zeros(tree):
    return jax.tree.map(jnp.zeros_like, tree)


def at_least_float32(dtype):
    """``dtype``, or float32 for a narrower float (no promotion rule asked: strict-safe)."""
    return jnp.dtype(dtype) if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)


def _accumulator(tree):
    """Zeros like ``tree`` in float32 at least: the weight gradients summed over the chunks
    (in bfloat16 or float16, a sum of many chunks' products would lose their low bits)."""
    return jax.tree.map(lambda w: jnp.zeros_like(w, dtype=at_least_float32(w.dtype)), tree)


def _batched_like(zeros, deps):
    """``zeros`` unchanged, but batched under ``vmap`` whenever anything in ``deps`` is.

    An accumulator typed unreduced must enter ``lax.scan`` batched if its updates
    will be: JAX cannot broadcast an unreduced value over a vmapped axis (jax 0.10
    raises "Using pspec[...] is dangerous"), which the scan would otherwise do to it.
    Each leaf of ``deps`` is selected away by a constant predicate (no arithmetic,
    so inf or NaN in them cannot leak in), which XLA folds out of the program.
    """
    tie = sum(jnp.where(False, jnp.sum(x).astype(jnp.float32), 0.0)
              for x in jax.tree.leaves(deps))  # a zero, batched like the deps
    return jax.tree.map(lambda z: z + tie.astype(z.dtype), zeros)


class _Layout(NamedTuple):
    """Steps ``start`` to ``start + n K`` of a run of T steps, in n chunks of K; steps
    at T and past are padding (only a nest's last chunk has any: see `segments`)."""

    T: int
    K: int
    n: int
    lengths: Any  # (B,) int or None; set to T when the segment is padded
    start: int = 0

    @staticmethod
    def segments(xs, lengths, opts):
        """The run as at most two segments in time order: as many whole chunks of K as
        T holds, then the r < K steps left, as one chunk of r steps (for a nest, of the
        multiple of the next size that holds them, padded). No step is padded, and none
        masked, but in a nest's last chunk; the price of the short chunk is a second
        trace of the chunk's loops."""
        T, B = xs.shape[:2]
        K = chunk_size(T, opts)
        n, r = divmod(T, K)
        segments = [_Layout(T, K, n, lengths)] if n else []
        if r:
            K_r = -(-r // opts.levels[0]) * opts.levels[0] if opts.levels else r
            if K_r != r and lengths is None:
                lengths = jnp.full((B,), T, jnp.int32)
            segments.append(_Layout(T, K_r, 1, lengths, n * K))
        return segments

    def steps(self):
        """The steps of the run in this segment (fewer than n K if it is padded)."""
        return min(self.n * self.K, self.T - self.start)

    def reader(self, tree):
        """``read(c)``: chunk c's blocks (K, ...) of the (T, ...) leaves of ``tree``,
        sliced in place (a padded segment reads a padded copy of its own steps)."""
        base = self.start
        if self.start + self.n * self.K > self.T:
            base, tree = 0, jax.tree.map(lambda x: self.unchunked(
                self.chunked(x[self.start:]), keep_padding=True), tree)
        return lambda c: jax.tree.map(
            lambda x: lax.dynamic_slice_in_dim(x, base + c * self.K, self.K), tree)

    def chunked(self, x):
        """(steps, ...) -> (n, K, ...), zero-padded."""
        pad = self.n * self.K - x.shape[0]
        if pad:  # (a pad, not a concatenate: it keeps x's sharding)
            x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape((self.n, self.K) + x.shape[1:])

    def unchunked(self, x, keep_padding=False):
        """(n, K, ...) -> (steps, ...), or (n K, ...) with ``keep_padding``."""
        x = x.reshape((self.n * self.K,) + x.shape[2:])
        return x if keep_padding else x[: self.steps()]

    def times(self, c):
        """The time index of each step of chunk c, (K,)."""
        first = self.start + lax.convert_element_type(c, jnp.int32) * self.K
        return first + jnp.arange(self.K, dtype=jnp.int32)

    def zeroed(self, xs_k, ts):
        """A block of inputs (K, B, n_x) at times ``ts`` (K,), zero on padded steps (which
        may hold garbage or inf): masked block by block, so that lengths cost no copy of
        all of xs."""
        if self.lengths is None:
            return xs_k
        return jnp.where((ts[:, None] < self.lengths[None, :])[..., None], xs_k, 0)


def _in_time_order(parts):
    """Per-segment (steps, ...) pytrees joined over time (one segment: no copy)."""
    if len(parts) == 1:
        return parts[0]
    return jax.tree.map(lambda *p: jnp.concatenate(p), *parts)


def _masks(t, layout, B, opts):
    """``(valid, cut)`` at time index t, each (B,) bool or None when not in use."""
    valid = None if layout.lengths is None else t < layout.lengths
    if not opts.truncate:
        return valid, None
    n = jnp.full((B,), layout.T, jnp.int32) if layout.lengths is None else layout.lengths
    taken = n - 1 - t if opts.reverse else jnp.broadcast_to(t, (B,))  # steps before this one
    cut = (taken > 0) & (taken % opts.truncate == 0)
    return valid, cut if valid is None else cut & valid


@jax.custom_jvp
def _tap(state, probe):
    """``state``, with ``probe``'s tangent added to its own: the probe's values are never
    read (NaN or inf included), and its gradient is the state's."""
    return state


@_tap.defjvp
def _tap_jvp(primals, tangents):
    return primals[0], tangents[0] + tangents[1]


def _run_chunk(cell, f, layout, B, opts, carry, zx, ts, probe, emit, step=None):
    """The forward over one chunk; ``emit(new, res)`` chooses what each step stacks.

    ``step(carry, zx_t, valid) -> (new, res_t)`` is ``cell.step`` unless given (a
    replay); rows where ``valid`` is False keep ``carry``.
    """
    step = functools.partial(cell.step, f) if step is None else step

    def body(carry, step_in):
        zx_t, t, probe_t = step_in
        valid, cut = _masks(t, layout, B, opts)
        if cut is not None:
            carry = _where(cut, lax.stop_gradient(carry), carry)
        if probe_t is None:
            new, res_t = step(carry, zx_t, valid)
        else:  # tapped before the padded rows are held, so that they get no gradient
            new, res_t = step(carry, zx_t, None)
            new = hold(valid, jax.tree.map(_tap, new, probe_t), carry)
        return new, emit(new, res_t)

    return lax.scan(body, carry, (zx, ts, probe), reverse=opts.reverse)


def _split(tree, k):
    """Every (K, ...) leaf as (K/k, k, ...): a span of steps in sub-chunks of k."""
    return jax.tree.map(lambda x: x.reshape((-1, k) + x.shape[1:]), tree)


def _join(tree):
    """The inverse of `_split`: (K/k, k, ...) -> (K, ...)."""
    return jax.tree.map(lambda y: y.reshape((-1,) + y.shape[2:]), tree)


def _run_span(cell, f, layout, B, opts, carry, xs, ts, probe, emit):
    """`_run_chunk` over a span of steps that nested checkpointing treats as one chunk,
    in sub-chunks of the innermost chunk size (the input projection of one at a time)."""
    if not opts.levels:
        return _run_chunk(cell, f, layout, B, opts, carry, cell.project(f, xs), ts, probe, emit)

    def body(carry, sub_in):
        xs_j, ts_j, probe_j = sub_in
        return _run_chunk(cell, f, layout, B, opts, carry, cell.project(f, xs_j), ts_j,
                          probe_j, emit)

    end, ys = lax.scan(body, carry, _split((xs, ts, probe), opts.levels[-1]),
                       reverse=opts.reverse)
    return end, _join(ys)


def _prevs(start, states, reverse):
    """The state each step of a block started from: ``start``, then the block's own."""
    if reverse:
        return jax.tree.map(lambda c, s: jnp.concatenate([s[1:], c[None]]), start, states)
    return jax.tree.map(lambda c, s: jnp.concatenate([c[None], s[:-1]]), start, states)


def _chunk_starts(carry0, states, K, reverse):
    """The state entering each chunk, (n, ...), picked from the saved states (T', ...)."""
    if reverse:  # chunk k is entered from the first state of chunk k + 1
        return jax.tree.map(lambda c, s: jnp.concatenate([s[K::K], c[None]]), carry0, states)
    return jax.tree.map(lambda c, s: jnp.concatenate([c[None], s[K - 1:-1:K]]), carry0, states)


def _keeps(cell, policy):
    """The `Saved` fields ``policy`` keeps for ``cell``.

    A `Gated` cell rebuilds a step's state from the previous one and the step's
    residuals without a matmul, so its states need not be kept but at each chunk's
    start: "gates" keeps the residuals, "states" the outputs (the hidden states,
    from which one batched matmul per chunk gives the gates back).
    """
    if policy == "checkpoint":
        return ("starts",)
    if policy == "gates":
        return ("res", "starts") if isinstance(cell, Gated) else ("states", "res")
    if isinstance(cell, HiddenState):  # its outputs are its states
        return ("states",)
    return ("outputs", "starts")


def _schedule(layout, opts):
    """The `_slots.Schedule` of a run keeping at most ``opts.slots`` chunk starts, or
    ``None`` when every chunk's start is kept."""
    if opts.slots is None or opts.slots >= layout.n:
        return None
    return _slots.schedule(layout.n, opts.slots)


def _by_chunk(order, opts):
    """An array over the chunks in the order the forward runs them, indexed by chunk."""
    return jnp.asarray(order[::-1] if opts.reverse else order)


def _write(buffer, i, state):
    return jax.tree.map(lambda b, s: lax.dynamic_update_index_in_dim(b, s, i, 0), buffer, state)


def _read(buffer, i):
    return jax.tree.map(lambda b: lax.dynamic_index_in_dim(b, i, 0, keepdims=False), buffer)


def forward(cell, params, xs, carry0, lengths=None, opts=Options(), probe=None, *,
            keep_residuals=True):
    """Runs ``cell`` over ``xs`` (T, B, n_x) from ``carry0``.

    Returns ``(hs, carry_T, saved)`` with ``saved`` a tuple of one `Saved` for the
    policy in ``opts`` per segment (`_Layout.segments`), in time order, over its
    n K steps (``None`` when not ``keep_residuals``).
    """
    f = cell.fuse(params)
    segments = _Layout.segments(xs, lengths, opts)
    hs, saved, carry = [None] * len(segments), [None] * len(segments), carry0
    for j in (reversed(range(len(segments))) if opts.reverse else range(len(segments))):
        hs[j], carry, saved[j] = _forward_segment(cell, f, segments[j], xs, carry, opts,
                                                  probe, keep_residuals)
    hs = _in_time_order(hs)
    if lengths is not None:  # (the kept outputs stay unmasked: they are states)
        valid = jnp.arange(xs.shape[0], dtype=jnp.int32)[:, None] < lengths[None, :]
        hs = jnp.where(valid[..., None], hs, 0)
    return hs, carry, tuple(saved) if keep_residuals else None


def _forward_segment(cell, f, layout, xs, carry0, opts, probe, keep_residuals):
    """`forward` over one segment: ``(hs, carry, saved)`` of its steps."""
    B = xs.shape[1]
    keep = _keeps(cell, opts.residuals) if keep_residuals else ()
    plan = _schedule(layout, opts) if keep_residuals else None
    read_x, read_probe = layout.reader(xs), layout.reader(probe)

    def emit(new, res):  # what each step stacks: the outputs (in the states if kept)
        return Saved(states=new if "states" in keep else None,
                     outputs=None if "states" in keep else cell.output(new),
                     res=res if "res" in keep else None)

    def chunk_body(carry, chunk_in):
        (carry, buffer), (c, slot) = carry, chunk_in
        ts = layout.times(c)
        end, ys = _run_span(cell, f, layout, B, opts, carry, layout.zeroed(read_x(c), ts), ts,
                            read_probe(c), emit)
        if buffer is not None:  # the starts the schedule keeps go to their slots
            return (end, _write(buffer, slot, carry)), (ys, None)
        return (end, None), (ys, carry if "starts" in keep else None)

    buffer = slot_of_chunk = None
    if plan is not None:  # m slots and a scratch one, which takes the starts not kept
        buffer = jax.tree.map(lambda c: jnp.broadcast_to(c, (opts.slots + 1,) + c.shape), carry0)
        slot_of_chunk = _by_chunk(plan.slot, opts)
    (carry_T, buffer), (ys, starts) = lax.scan(
        chunk_body, (carry0, buffer),
        (jnp.arange(layout.n, dtype=jnp.int32), slot_of_chunk), reverse=opts.reverse)
    starts = buffer if plan is not None else starts
    ys = jax.tree.map(lambda y: layout.unchunked(y, keep_padding=True), ys)
    hs = (cell.output(ys.states) if "states" in keep else ys.outputs)[: layout.steps()]
    if not keep_residuals:
        return hs, carry_T, None
    return hs, carry_T, ys._replace(outputs=ys.outputs if "outputs" in keep else None,
                                    starts=starts, entry=carry0)


def backward(cell, params, xs, carry0, saved, dhs, dcarry_T, lengths=None, opts=Options(),
             with_probe=False):
    """The BPTT reverse scan: cotangents of (hs, carry_T) -> of (params, xs, carry0).

    ``saved`` is `forward`'s: a `Saved` per segment. With ``with_probe`` it also
    returns dL/d(state<t>) for every t (the probe's gradient).
    """
    f = cell.fuse(params)
    segments = _Layout.segments(xs, lengths, opts)
    deps = (f, xs, dhs, dcarry_T, carry0, saved)  # what the chunks' gradients vary with
    df = varying_like(_accumulator(f), deps)
    rows = _row_axes(xs)  # sharded rows: each device sums its own, reduced once at the end
    if rows:
        df = _batched_like(df, (*deps, lengths))
        df = jax.tree.map(lambda z: jax.reshard(z, _on_mesh_of(xs, rows)), df)
    acc, dstates = (varying_like(dcarry_T, deps), df), [None] * len(segments)
    dxs = varying_like(jnp.zeros_like(xs), deps) if len(segments) > 1 else None
    for j in (range(len(segments)) if opts.reverse else reversed(range(len(segments)))):
        entry = carry0 if saved[j].entry is None else saved[j].entry
        acc, dxs, dstates[j] = _backward_segment(cell, f, segments[j], xs, entry, saved[j],
                                                 dhs, acc, dxs, opts, with_probe)
    dcarry0, df = acc
    if rows:
        df = jax.tree.map(lambda g: jax.reshard(g, _on_mesh_of(xs)), df)
    df = jax.tree.map(lambda g, w: g.astype(w.dtype), df, f)
    grads = (cell.unfuse(params, df), dxs, dcarry0)
    if with_probe:
        return (*grads, _in_time_order(dstates))
    return grads


def _backward_segment(cell, f, layout, xs, carry0, saved, dhs, acc, dxs, opts, with_probe):
    """`backward` over one segment entered from ``carry0``: ``acc`` = (dL/d(state) after
    it, the weight gradients so far) -> ``(acc, dxs, dstates)``, acc now before it.

    ``dxs`` is the run's (T, ...) input gradients, which the segment writes in place,
    or ``None`` for a run of one segment: the segment's are then returned."""
    B = xs.shape[1]

    def step_bwd(dcarry, step_in):
        carry_prev, carry, res_t, dh_t, t = step_in
        valid, cut = _masks(t, layout, B, opts)
        dprev, dz = cell.step_bwd(f, carry_prev, carry, res_t, dcarry, dh_t)
        # dL/d(state<t>): what step t+1 sent back, plus the output's own cotangent.
        dstate = cell.add_output(dcarry, dh_t) if with_probe else None
        if valid is not None:  # a padded step is the identity on the state
            dprev = _where(valid, dprev, dcarry)
            dz = _where(valid, dz, _zeros(dz))
            dstate = None if dstate is None else _where(valid, dstate, _zeros(dstate))
        if cut is not None:  # the state entering this step was cut from the gradient
            dprev = _where(cut, _zeros(dprev), dprev)
        return dprev, (dz, dstate)

    def cut_off(ts, prevs):
        """The states entering a block's steps (K, B, ...), constant where truncation cut
        them: to every order, as the forward's stop_gradient makes them (grad of grad)."""
        if not opts.truncate:
            return prevs
        cuts = jax.vmap(lambda t: _masks(t, layout, B, opts)[1])(ts)  # (K, B)
        return _where(cuts, lax.stop_gradient(prevs), prevs)

    def nested(acc, xs_k, ts, dh_k, start, probe_k, levels):
        """A chunk's backward, nested: rerun its forward keeping the state entering each of
        its sub-chunks of ``levels[0]`` steps, then run over them against time."""
        xs_s, ts_s, dh_s, probe_s = _split((xs_k, ts, dh_k, probe_k), levels[0])

        def rerun(carry, sub_in):
            xs_j, ts_j, probe_j = sub_in
            end = _run_span(cell, f, layout, B, opts, carry, xs_j, ts_j, probe_j,
                            lambda new, res: None)[0]
            return end, carry

        starts = lax.scan(rerun, start, (xs_s, ts_s, probe_s), reverse=opts.reverse)[1]
        acc, ys = lax.scan(functools.partial(chunk_body, levels=levels[1:]), acc,
                           (xs_s, ts_s, dh_s, (starts, None, probe_s)),
                           reverse=not opts.reverse)
        return acc, _join(ys)

    def chunk_body(acc, chunk_in, levels=opts.levels):
        dcarry, df = acc
        xs_k, ts, dh_k, (start, kept, probe_k) = chunk_in  # kept: a Saved of this chunk
        if len(levels) == len(opts.levels):  # the top level (a nest's sub-chunks come zeroed)
            xs_k = layout.zeroed(xs_k, ts)
        if levels:
            return nested(acc, xs_k, ts, dh_k, start, probe_k, levels)
        if opts.residuals == "checkpoint":  # rerun this chunk's forward from its first state
            states, res = _run_chunk(cell, f, layout, B, opts, start, cell.project(f, xs_k),
                                     ts, probe_k, lambda new, res: (new, res))[1]
        else:
            states, res = kept.states, kept.res
            if res is None:  # the gates of every step of the chunk in one batched matmul
                a_prevs = cut_off(ts, cell.output(_prevs(start, states, opts.reverse))
                                  if states is not None else
                                  _prevs(cell.output(start), kept.outputs, opts.reverse))
                res = cell.gates(f, a_prevs, cell.project(f, xs_k))
            if states is None:  # replayed from the chunk's first state: no matmul
                states = _run_chunk(cell, f, layout, B, opts, start, res, ts, None,
                                    lambda new, _: new,
                                    lambda s, r, v: (cell.replay(s, r, v), None))[1]
        prevs = cut_off(ts, _prevs(start, states, opts.reverse))  # (as above: XLA's CSE)
        dcarry, (dz, dstates) = lax.scan(step_bwd, dcarry, (prevs, states, res, dh_k, ts),
                                         reverse=not opts.reverse)
        df_k, dxs_k = cell.chunk_grads(f, xs_k, prevs, res, dz)
        df = jax.tree.map(lambda acc, g: acc + g.astype(acc.dtype), df, df_k)
        return (dcarry, df), (dxs_k, dstates)

    plan, read_x, read_dh = _schedule(layout, opts), layout.reader(xs), layout.reader(dhs)

    def rerun_to(buffer, u):
        """The state entering chunk u (counted in the order the forward runs them),
        rerun from the latest one kept; the states passed go to their slots."""
        slot, start = jnp.asarray(plan.slot), jnp.asarray(plan.start)

        def body(q, state_buffer):
            state, buffer = state_buffer
            c = layout.n - 1 - q if opts.reverse else q
            ts = layout.times(c)
            state = _run_span(cell, f, layout, B, opts, state, layout.zeroed(read_x(c), ts), ts,
                              None, lambda new, res: None)[0]
            return state, _write(buffer, slot[q + 1], state)

        # (a loop of a data-dependent trip count: JAX differentiates it forward, so
        # jax.hessian works, but not in reverse, so a gradient of the gradient does not)
        return lax.fori_loop(start[u], u, body, (_read(buffer, slot[start[u]]), buffer))

    def top_body(carry, chunk_in):  # chunk c's inputs and output cotangents, read in place
        (acc, dxs_all), (c, (start, kept, probe_k)) = carry, chunk_in
        acc, (dxs_k, dstates) = chunk_body(
            acc, (read_x(c), layout.times(c), read_dh(c), (start, kept, probe_k)))
        if dxs_all is not None:  # written in place into the run's (T, ...) buffer
            dxs_k, dxs_all = None, lax.dynamic_update_slice_in_dim(
                dxs_all, dxs_k[: layout.steps()], layout.start + c * layout.K, 0)
        return (acc, dxs_all), (dxs_k, dstates)

    def slot_body(carry, chunk_in):
        (carry, buffer), (c, (u, kept, probe_k)) = carry, chunk_in
        start, buffer = rerun_to(buffer, u)
        carry, ys = top_body(carry, (c, (start, kept, probe_k)))
        return (carry, buffer), ys

    starts, probe = saved.starts, None
    if starts is None:  # picked from the kept states
        starts = _chunk_starts(carry0, saved.states, layout.K, opts.reverse)
    if opts.residuals == "checkpoint" and with_probe:  # (the rerun's tap: values unused)
        probe = jax.tree.map(lambda s: jnp.zeros((layout.n, layout.K) + s.shape, s.dtype),
                             carry0)
    kept = jax.tree.map(layout.chunked, saved._replace(starts=None, entry=None))  # (n, K, ...)
    body, init, per_chunk = top_body, (acc, dxs), starts
    if plan is not None:  # the starts come from the slots: the scan runs over chunk numbers
        body, init, per_chunk = slot_body, (init, starts), _by_chunk(np.arange(layout.n), opts)
    chunks = jnp.arange(layout.n, dtype=jnp.int32)
    out, (dxs_c, dstates) = lax.scan(body, init, (chunks, (per_chunk, kept, probe)),
                                     reverse=not opts.reverse)
    acc, dxs = out if plan is None else out[0]
    dstates = jax.tree.map(layout.unchunked, dstates) if with_probe else None
    return acc, layout.unchunked(dxs_c) if dxs is None else dxs, dstates


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _bptt(cell, opts, params, xs, carry0, lengths, probe):
    hs, carry_T, _ = forward(cell, params, xs, carry0, lengths, opts, probe, keep_residuals=False)
    return hs, carry_T


def _bptt_fwd(cell, opts, params, xs, carry0, lengths, probe):
    hs, carry_T, saved = forward(cell, params, xs, carry0, lengths, opts, probe)
    return (hs, carry_T), (params, xs, carry0, lengths, saved)


def _bptt_bwd(cell, opts, residuals, cotangents):
    params, xs, carry0, lengths, saved = residuals
    dhs, dcarry_T = cotangents
    grads = _backward_compiled(cell, params, xs, carry0, saved, dhs, dcarry_T, lengths, opts,
                               opts.probe)
    grads = (*_match_vma(grads[:3], (params, xs, carry0)), *grads[3:])
    if opts.probe:
        return (*grads[:3], None, grads[3])  # lengths are integers: no cotangent
    return (*grads, None, None)


_bptt.defvjp(_bptt_fwd, _bptt_bwd)

# A jax.grad outside jit runs the backward rule eagerly, after the forward: through jit it is
# compiled once per shapes and options instead of traced and compiled anew (its loops' bodies
# are new closures) at every call. Inlined under an outer jit, which then sees no call.
_backward_compiled = jax.jit(backward, static_argnums=(0, 8, 9), inline=True)


def run(cell, params, xs, state0, *, lengths=None, probe=None, **options):
    """Validates the call and runs ``cell``; returns ``(hs, state_T)`` (`_run`).

    A call of arrays (or tracers) with hashable options runs through `jax.jit`, compiled
    once per shapes and options: the loops' bodies are new closures at every call, which
    ``lax.scan`` would otherwise trace and compile anew each time, eagerly and under an
    eager ``jax.grad`` alike. Under an outer ``jit`` the inner one is inlined.
    """
    if isinstance(lengths, (list, tuple)):  # as an array, so that the call is compiled once
        lengths = jnp.asarray(lengths)
    arrays = jax.tree.leaves((params, xs, state0, lengths, probe))
    compiled = all(isinstance(x, (jax.Array, np.ndarray)) for x in arrays)
    try:
        hash(tuple(options.values()))
    except TypeError:  # (an unhashable option: `_run` names what is wrong with it)
        compiled = False
    if compiled:
        return _run_compiled(cell, params, xs, state0, lengths, probe, **options)
    return _run(cell, params, xs, state0, lengths=lengths, probe=probe, **options)


def _run(cell, params, xs, state0, *, n_x, n_a, dtype, backward, lengths, reverse, truncate,
         time_major, probe=None, residuals="gates", chunk=None, slots=None):
    """Validates the call and runs ``cell``; returns ``(hs, state_T)``.

    ``backward="bptt"``: the custom_vjp above (hand-derived reverse scan);
    ``backward="autodiff"``: the same forward, differentiated by JAX (in one chunk
    unless ``chunk`` is given: the plain scan a user would write).
    """
    _checks.backward_mode(backward)
    reverse, time_major = _checks.flag("reverse", reverse), _checks.flag("time_major", time_major)
    if isinstance(residuals, str) and residuals not in POLICIES:
        raise ValueError(f"residuals must be one of {POLICIES} or a memory budget in bytes, "
                         f"got {residuals!r}")
    xs = _checks.time_major(xs, time_major)
    T, B = _checks.sequence(xs, n_x, dtype, time_major)
    cell_chunk = default_chunk(cell, B, n_a, dtype)
    if not isinstance(residuals, str):  # a budget in bytes: the fastest plan that fits
        if chunk is not None:
            raise ValueError("chunk= cannot be given with a memory budget: the plan chooses it")
        from jaxbptt import memory  # noqa: PLC0415 (memory imports this module)
        if slots is not None:
            raise ValueError("slots= cannot be given with a memory budget: the plan chooses it")
        if backward == "autodiff":  # JAX keeps what it keeps: the budget is only checked
            memory.check_budget(residuals)
            residuals = "gates"
        else:
            residuals, chunk, _, slots = memory.plan(
                T, memory.footprint(cell, params, B, n_x, n_a, dtype), residuals, cell_chunk)
    spec = tuple(getattr(jax.typeof(xs).sharding, "spec", ()))
    if any(e is not None for e in spec[2:]):
        # On an Explicit mesh only the rows of xs may be sharded: a sharded feature axis
        # is gathered here (and its gradient sharded back by JAX).
        xs = jax.reshard(xs, jax.sharding.NamedSharding(
            jax.typeof(xs).sharding.mesh, jax.sharding.PartitionSpec(*spec[:2])))
    if state0 is None:  # zeros laid out like xs's rows (sharding, shard_map axes)
        state0 = cell.zero_state(B, n_a, dtype)
        if not _row_axes(xs):
            like = jnp.zeros_like(xs[0, :, :1])
            state0 = jax.tree.map(lambda z: jnp.broadcast_to(like, z.shape), state0)
    cell.check_state(state0, B, n_a, dtype)
    state0 = _as_rows_of(xs, state0)
    lengths = _checks.lengths(lengths, B, T)
    chunk, levels = _checks.chunk(chunk, residuals), ()
    slots = _checks.slots(slots, residuals, chunk)
    if isinstance(chunk, tuple):
        chunk, levels = chunk[0], chunk[1:]
    if backward == "autodiff" and chunk is None:
        chunk = T
    opts = Options(bool(reverse), _checks.truncate(truncate), probe is not None, residuals, chunk,
                   levels, slots, cell_chunk)
    if probe is not None:
        _checks.probe(probe, state0, T)
    # In shard_map, the carry varies as the data does, and so does the probe, which the
    # carry's gradient becomes: an invariant one is cast, its gradient summed by JAX.
    state0, probe = varying_like((state0, probe), (xs, params, lengths, state0, probe))
    if backward == "bptt":
        hs, state_T = _bptt(cell, opts, params, xs, state0, lengths, probe)
    else:
        hs, state_T, _ = forward(cell, params, xs, state0, lengths, opts, probe,
                                 keep_residuals=False)
    return (hs if time_major else jnp.swapaxes(hs, 0, 1)), state_T


_run_compiled = jax.jit(
    lambda cell, params, xs, state0, lengths, probe, **options: _run(
        cell, params, xs, state0, lengths=lengths, probe=probe, **options),
    static_argnums=0, static_argnames=("n_x", "n_a", "dtype", "backward", "reverse", "truncate",
                                       "time_major", "residuals", "chunk", "slots"),
    inline=True)
