"""Multi-device checks for ``test_sharding.py``, run in a subprocess (not a test module).

Simulated CPU devices need ``--xla_force_host_platform_device_count`` in
``XLA_FLAGS`` before JAX initialises, which the pytest process has already done,
so ``test_sharding.py`` runs this script once per device count::

    python tests/sharding_cases.py --devices 4      # prints one JSON report on stdout
    python tests/sharding_cases.py --devices 4 --memory   # per-device memory table (docs)

Every comparison is against the same computation on a single device in this
process, in float64. The report holds numbers and HLO facts; the asserts live in
``test_sharding.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import sys

# Shapes: small (compile time dominates). T = 19 spans two of the driver's
# 8-step chunks and a last chunk of 3 steps. B, B/4 = 12 and B/8 = 6 appear in no
# parameter or ensemble shape (n_a = 5, n_x = 3: sizes 3, 5, 8, 10, 15, 20; 4 and
# 8 members), so a collective on an array with a batch-sized axis is recognised.
T, B, N_X, N_A = 19, 48, 3, 5
ENSEMBLE = 8
TOL = 1e-12


def _parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--all", action="store_true",
                        help="also the cases of cases(everything=True) (the suite's --runslow)")
    parser.add_argument("--memory", action="store_true",
                        help="print per-device residual and compiled memory of every cell's "
                        "gradient (float32, T=100, B=64, n_x=32, n_a=128) instead")
    return parser.parse_args()


ARGS = _parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   os.environ.get("XLA_FLAGS", "")).split()
    # LLVM -O0: compiling dominates the run time and -O0 roughly halves it. The HLO
    # passes (SPMD partitioning, collectives, buffer assignment) are unaffected.
    flags += [f"--xla_force_host_platform_device_count={ARGS.devices}",
              "--xla_backend_optimization_level=0"]
    os.environ["XLA_FLAGS"] = " ".join(flags)
    os.environ["JAX_PLATFORMS"] = "cpu"  # simulated devices are host (CPU) devices

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jaxbptt as jb  # noqa: E402
from cells import make, rel_err  # noqa: E402

BATCH = P(None, "batch", None)  # xs, hs, dxs (T, B, .); a stack's init (L*D, B, n_a)
ROWS = P("batch", None)  # a state (B, n_a)
MODES = ("bptt", "autodiff")


# ---------------------------------------------------------------------------- problems

def _rng_like(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape)), tree)


class Problem:
    """A model, its inputs, cotangent weights and the specs of every argument.

    ``name`` is a cell of ``cells.CELLS`` or ``"stack"``, optionally with a residual
    policy of the bptt driver: ``"lstm:checkpoint"``, or ``"lstm:slots"`` (checkpoint
    with 3 slots for 10 chunks of 2 steps).
    """

    def __init__(self, name):
        self.name = name
        self.lengths = None
        name, _, policy = name.partition(":")
        extra = {"residuals": policy} if policy else {}
        if policy == "slots":
            extra = {"residuals": "checkpoint", "chunk": 2, "slots": 3}
        if name == "stack":
            # 2 bidirectional LSTM layers, ragged lengths: exercises reverse + lengths.
            fwd = [make("lstm", T, B, n_x, N_A, seed=s)[1] for s, n_x in ((0, N_X), (1, 2 * N_A))]
            bwd = [make("lstm", T, B, n_x, N_A, seed=s)[1] for s, n_x in ((2, N_X), (3, 2 * N_A))]
            self.params = tuple(jb.Bidirectional(f, b) for f, b in zip(fwd, bwd))
            _, _, self.xs, _ = make("lstm", T, B, N_X, N_A)
            rng = np.random.default_rng(7)
            init = jnp.asarray(0.5 * rng.normal(size=(2, 4, B, N_A)))
            self.state0 = jb.LSTMState(init[0], init[1])
            self.lengths = jnp.asarray(rng.integers(1, T + 1, B))
            self.state_spec = jb.LSTMState(BATCH, BATCH)

            def fn(params, xs, state0, lengths, backward):
                return jb.stack(params, xs, state0, lengths=lengths, backward=backward)
        else:
            cell_fn, self.params, self.xs, self.state0 = make(name, T, B, N_X, N_A)
            self.state_spec = jax.tree.map(lambda _: ROWS, self.state0)

            def fn(params, xs, state0, lengths, backward):
                kw = extra if backward == "bptt" else {}
                return cell_fn(params, xs, state0, lengths=lengths, backward=backward, **kw)
        self.fn = fn
        out = jax.eval_shape(lambda p, x, s, n: fn(p, x, s, n, "bptt"),
                             self.params, self.xs, self.state0, self.lengths)
        self.w_hs, self.w_final = _rng_like(out, 11)
        self.final_spec = self.state_spec

    def loss(self, params, xs, state0, w_hs, w_final, lengths, backward):
        hs, final = self.fn(params, xs, state0, lengths, backward)
        on_final = sum(jnp.sum(s * w) for s, w in
                       zip(jax.tree.leaves(final), jax.tree.leaves(w_final)))
        return jnp.sum(hs * w_hs) + on_final, hs

    def args(self):
        return (self.params, self.xs, self.state0, self.w_hs, self.w_final, self.lengths)

    def specs(self):
        """PartitionSpecs of ``args()`` for batch data parallelism."""
        return (jax.tree.map(lambda _: P(), self.params), BATCH, self.state_spec, BATCH,
                self.final_spec, None if self.lengths is None else P("batch"))

    def n_params(self):
        return sum(x.size for x in jax.tree.leaves(self.params))


def step_fn(problem, backward):
    """(params, xs, state0, w_hs, w_final, lengths) -> (hs, (dparams, dxs, dstate0))."""

    def step(params, xs, state0, w_hs, w_final, lengths):
        (_, hs), grads = jax.value_and_grad(problem.loss, argnums=(0, 1, 2), has_aux=True)(
            params, xs, state0, w_hs, w_final, lengths, backward)
        return hs, grads

    return step


_REFERENCES = {}


def reference(problem, backward):
    """(hs, grads) of ``problem`` on one device (jax.devices()[0]), computed once."""
    key = (problem.name, backward)
    if key not in _REFERENCES:
        _REFERENCES[key] = jax.jit(step_fn(problem, backward))(*on_one_device(problem.args()))
    return _REFERENCES[key]


def put(tree, specs, mesh):
    """device_put every leaf of ``tree`` with the matching PartitionSpec of ``specs``."""
    return jax.tree.map(lambda s, x: None if x is None else
                        jax.device_put(x, NamedSharding(mesh, s)), specs, tree,
                        is_leaf=lambda s: s is None or isinstance(s, P))


def on_one_device(tree):
    return jax.device_put(tree, jax.devices()[0])


# ---------------------------------------------------------------------------- HLO

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$")
_SHAPE = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^\s*(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute", "collective-broadcast")


def _shapes(text):
    return [[int(d) for d in dims.split(",") if d] for _, dims in _SHAPE.findall(text)]


def collectives(hlo):
    """Every collective of a compiled HLO module: op, result and operand shapes, computation.

    Async pairs (``all-gather-start`` / ``-done``) are reported once, at the start.
    Operand shapes are resolved from the defining instructions.
    """
    defined, found, computation, entry = {}, [], None, False
    for line in hlo.splitlines():
        m = _INSTR.match(line)
        if m is None:
            c = _COMPUTATION.match(line)
            if c is not None and "=" not in line.split("(")[0]:
                computation, entry = c.group(1), line.lstrip().startswith("ENTRY")
            continue
        name, type_text, op, rest = m.groups()
        defined[name] = _shapes(type_text)
        base = op[:-len("-start")] if op.endswith("-start") else op
        if base in COLLECTIVES:
            operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
            groups = re.search(r"replica_groups=(.*?)(?:, [a-z_]+=|$)", rest)
            found.append({"op": base, "name": name, "computation": computation, "entry": entry,
                          "replica_groups": groups.group(1) if groups else None,
                          "shapes": defined[name],
                          "operand_shapes": [s for o in operands for s in defined.get(o, [])]})
    return found


def batch_indexed(shape, n_dev):
    """An array with a batch axis, full (B) or local (B/N), or one flattened to rows*B.

    In data parallelism nothing indexed by the batch should cross devices: states,
    activations, residuals, their gradients. Parameter-shaped arrays have none of
    these sizes (see the shapes above); rows: T, 8 (a chunk) and 3 (the last chunk).
    """
    sizes = {r * b for r in (1, T, 8, T % 8) for b in (B, B // n_dev)}
    return any(d in sizes for d in shape)


def hlo_summary(compiled, n_dev):
    colls = collectives(compiled.as_text())
    gathers_full = [c for c in colls if c["op"] == "all-gather" and any(
        B in s for s in c["shapes"] + c["operand_shapes"])]
    batched = [c for c in colls if any(batch_indexed(s, n_dev)
                                       for s in c["shapes"] + c["operand_shapes"])]
    reduced = [c for c in colls if c["op"] == "all-reduce"]
    return {
        "collectives": sorted({f"{c['op']} {c['shapes']}" for c in colls}),
        "n_all_reduce": len(reduced),
        "all_reduce_elements": int(sum(np.prod(s) for c in reduced for s in c["shapes"])),
        "all_reduce_shapes": [s for c in reduced for s in c["shapes"]],
        "all_reduce_groups": sorted({str(c["replica_groups"]) for c in reduced}),
        "collectives_outside_entry": [c for c in colls if not c["entry"]],
        "all_gathers": [c["shapes"] for c in colls if c["op"] == "all-gather"],
        "full_batch_all_gathers": gathers_full,
        "batch_indexed_collectives": batched,
    }


# ---------------------------------------------------------------------------- checks

def _is(sharding, mesh, spec, ndim):
    return bool(sharding.is_equivalent_to(NamedSharding(mesh, spec), ndim))


def data_parallel(mesh, names, modes=MODES):
    """Check 1 and 2: jit(grad) on batch-sharded inputs vs one device; HLO collectives."""
    n_dev = mesh.size
    rows = []
    for name in names:
        pb = Problem(name)
        grads = {}
        for backward in modes:
            step = step_fn(pb, backward)
            ref_hs, ref = reference(pb, backward)
            args = put(pb.args(), pb.specs(), mesh)
            compiled = jax.jit(step).lower(*args).compile()
            hs, (dp, dxs, ds0) = compiled(*args)
            grads[backward] = (dp, dxs, ds0)
            rows.append({
                "model": name, "backward": backward,
                "grad_rel_err": rel_err((dp, dxs, ds0), ref),
                "hs_rel_err": rel_err(hs, ref_hs),
                "hs_spec": str(hs.sharding.spec),
                "hs_batch_sharded": _is(hs.sharding, mesh, BATCH, 3),
                "dxs_spec": str(dxs.sharding.spec),
                "dxs_batch_sharded": _is(dxs.sharding, mesh, BATCH, 3),
                "dstate0_batch_sharded": all(
                    _is(g.sharding, mesh, s, g.ndim) for g, s in
                    zip(jax.tree.leaves(ds0), jax.tree.leaves(pb.state_spec))),
                "dparams_replicated": all(g.sharding.is_fully_replicated
                                          for g in jax.tree.leaves(dp)),
                "n_params": pb.n_params(),
                **hlo_summary(compiled, n_dev),
            })
        if len(grads) == 2:
            rows[-1]["bptt_vs_autodiff"] = rel_err(grads["bptt"], grads["autodiff"])
    return rows


def shard_map_explicit(mesh, names, modes=MODES, check_vma=True):
    """Check 3: per-device grad in shard_map, parameter gradients psum-ed by hand.

    The params are cast to 'varying' over the batch axis first, so that their
    gradient is the local (per-shard) one and the psum is ours; with
    ``check_vma=False`` there is no type tracking and the psum is needed as well.
    """
    rows = []
    for name in names:
        pb = Problem(name)
        for backward in modes:
            step = step_fn(pb, backward)
            _, ref = reference(pb, backward)

            def local(params, xs, state0, w_hs, w_final, lengths, step=step):
                if check_vma:
                    params = jax.lax.pcast(params, "batch", to="varying")
                _, (dp, dxs, ds0) = step(params, xs, state0, w_hs, w_final, lengths)
                return jax.lax.psum(dp, "batch"), dxs, ds0

            specs = pb.specs()
            out_specs = (specs[0], BATCH, pb.state_spec)
            sm = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=out_specs,
                               check_vma=check_vma)
            got = jax.jit(sm)(*put(pb.args(), specs, mesh))
            rows.append({"model": name, "backward": backward, "check_vma": check_vma,
                         "grad_rel_err": rel_err(got, ref),
                         "dxs_batch_sharded": _is(got[1].sharding, mesh, BATCH, 3)})
    return rows


def shard_map_replicated_params(mesh, cases):
    """The natural form: replicated (invariant) params inside shard_map, no psum written.

    Under check_vma JAX's autodiff inserts the psum itself (the transpose of the
    implicit 'pvary' of the params). ``cases``: (model, state0, backward) with
    state0 ``"sharded"`` (an input split on the batch), ``"None"`` (the library's
    zeros) or ``"zeros"`` (invariant zeros made inside the per-device function).
    """
    rows = []
    for name, state0_kind, backward in cases:
        pb = Problem(name)
        step = step_fn(pb, backward)
        zero = jax.tree.map(jnp.zeros_like, pb.state0)

        def local(params, xs, state0, w_hs, w_final, lengths, pb=pb, backward=backward,
                  kind=state0_kind):
            if kind == "None":
                state0 = None
            elif kind == "zeros":
                state0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state0)

            def loss(params, xs):
                return pb.loss(params, xs, state0, w_hs, w_final, lengths, backward)[0]
            return jax.grad(loss, argnums=(0, 1))(params, xs)

        specs = pb.specs()
        sm = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(specs[0], BATCH))
        row = {"model": name, "backward": backward, "state0": state0_kind, "error": None,
               "grad_rel_err": None}
        try:
            got = jax.jit(sm)(*put(pb.args(), specs, mesh))
        except Exception as e:  # noqa: BLE001 -- reported, asserted on by the test
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
        else:
            if state0_kind == "sharded":
                _, (dp, dxs, _) = reference(pb, backward)
            else:  # a zero initial state, on one device
                args = (pb.params, pb.xs, zero, pb.w_hs, pb.w_final, pb.lengths)
                _, (dp, dxs, _) = jax.jit(step)(*on_one_device(args))
            row["grad_rel_err"] = rel_err(got, (dp, dxs))
        rows.append(row)
    return rows


def shard_map_ensemble(mesh, names):
    """An ensemble: one member's params on each device (split on the mesh axis), the
    same inputs and initial state on every device (invariant), each member's own loss.
    The recurrent carry varies with the params, not with the data."""
    rows = []
    for name in names:
        members = [make(name, T, B, N_X, N_A, seed=s) for s in range(mesh.size)]
        fn, xs, state0 = members[0][0], members[0][2], members[0][3]
        stacked = jax.tree.map(lambda *p: jnp.stack(p), *[m[1] for m in members])
        w = _rng_like(jax.eval_shape(lambda: fn(members[0][1], xs, state0)[0]), 11)
        spec = jax.tree.map(lambda _: P("batch"), stacked)
        for backward in MODES:
            def member_loss(p, backward=backward):
                return jnp.sum(fn(p, xs, state0, backward=backward)[0] * w)

            def local(p, member_loss=member_loss):
                g = jax.grad(member_loss)(jax.tree.map(lambda a: a[0], p))
                return jax.tree.map(lambda a: a[None], g)

            row = {"model": name, "backward": backward, "error": None, "grad_rel_err": None}
            try:
                got = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec,),
                                            out_specs=spec))(put(stacked, spec, mesh))
            except Exception as e:  # noqa: BLE001 -- reported, asserted on by the test
                row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
            else:
                one = jax.jit(jax.grad(lambda p: member_loss(p, "autodiff")))
                ref = [one(*on_one_device((m[1],))) for m in members]
                row["grad_rel_err"] = rel_err(got, jax.tree.map(lambda *g: jnp.stack(g), *ref))
            rows.append(row)
    return rows


def explicit_mesh(cases):
    """jit(grad) on a mesh from ``jax.make_mesh`` with its default axis types.

    In jax 0.10 those are ``Explicit`` (sharding in types): every op must be able
    to tell its output sharding, and a contraction over the sharded batch axis has
    to be told (``out_sharding=``).
    """
    mesh = jax.make_mesh((len(jax.devices()),), ("batch",))
    rows = []
    for (name, backward), in_context in itertools.product(cases, (False, True)):
        if in_context and (name, backward) not in (("lstm", "bptt"), ("stack", "bptt")):
            continue  # (under set_mesh: one cell and the stack suffice)
        pb = Problem(name)
        row = {"model": name, "backward": backward, "axis_types": str(mesh.axis_types),
               "set_mesh": in_context, "error": None, "grad_rel_err": None}
        try:  # also traced under jax.set_mesh, where every op is typed on the mesh
            with jax.set_mesh(mesh) if in_context else contextlib.nullcontext():
                args = put(pb.args(), pb.specs(), mesh)
                compiled = jax.jit(step_fn(pb, backward)).lower(*args).compile()
                _, got = compiled(*args)
        except Exception as e:  # noqa: BLE001 -- reported, asserted on by the test
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
        else:
            row["grad_rel_err"] = rel_err(got, reference(pb, backward)[1])
            row["dxs_batch_sharded"] = _is(got[1].sharding, mesh, BATCH, 3)
            row["dparams_replicated"] = all(g.sharding.is_fully_replicated
                                            for g in jax.tree.leaves(got[0]))
            row["n_params"] = pb.n_params()
            row.update(hlo_summary(compiled, mesh.size))
        rows.append(row)
    return rows


def other_layouts(mesh):
    """Layouts beyond the batch split, each gradient (bptt) against one device.

    In shard_map: the output layer's loss with replicated (invariant) params, and an
    invariant probe (zeros made in the per-device function). On jax.make_mesh's mesh
    (Explicit axes): a replicated initial state, jb.stack's own zeros under set_mesh,
    xs sharded on its feature axis and a state sharded on its hidden axis (each
    resharded as the scan needs: the batch rows sharded, the rest replicated).
    """
    n = mesh.size
    explicit = jax.make_mesh((n,), ("batch",))
    fn, params, xs, s0 = make("lstm", T, B, N_X, N_A)
    w = _rng_like(jax.ShapeDtypeStruct((T, B, N_A), xs.dtype), 11)
    out = jb.OutputParams(*_rng_like((jnp.ones((4, N_A)), jnp.ones((4,))), 12))
    labels = jnp.asarray(np.random.default_rng(13).integers(0, 4, (T, B)))

    def loss(p, xs, s0, w, **kw):
        hs, final = fn(p, xs, s0, **kw)
        return jnp.sum(hs * w) + jnp.sum(final.c * w[0])

    def grad(f, argnums):
        return jax.jit(jax.grad(f, argnums=argnums))

    def xent_local(o, hs, labels):
        return jax.grad(lambda o: jb.cross_entropy(o, hs, labels))(o)

    def probe_local(p, xs, s0, w):
        probe = jax.tree.map(lambda a: jnp.zeros((T,) + a.shape, a.dtype), s0)
        return jax.grad(lambda p: loss(p, xs, s0, w, probe=probe))(p)

    hs = _rng_like(jax.ShapeDtypeStruct((T, B, N_A), xs.dtype), 14)
    sm = lambda f, specs, out_spec: jax.jit(jax.shard_map(  # noqa: E731
        f, mesh=mesh, in_specs=specs, out_specs=out_spec))
    wide_fn, wide_p, wide_xs, wide_s0 = make("lstm", T, B, 2 * n, 2 * n)  # n_x, n_a split n ways

    def wide_loss(p, xs, s0):
        return jnp.sum(wide_fn(p, xs, s0)[0] ** 2)

    stack = Problem("stack")
    state_rows = jax.tree.map(lambda _: ROWS, s0)
    cases = {  # name: (function, arguments, their specs, mesh, one-device reference)
        "shard_map: cross_entropy, invariant params": (
            sm(xent_local, (P(), BATCH, P(None, "batch")), P()), (out, hs, labels),
            (P(), BATCH, P(None, "batch")), mesh,
            jax.grad(lambda o, h, y: jb.cross_entropy(o, h, y, backward="autodiff"))),
        "shard_map: invariant probe": (
            sm(probe_local, (P(), BATCH, state_rows, BATCH), P()), (params, xs, s0, w),
            (P(), BATCH, state_rows, BATCH), mesh,
            jax.grad(lambda p, xs, s0, w: loss(p, xs, s0, w, backward="autodiff"))),
        "explicit: replicated initial state": (
            grad(loss, (0, 1, 2)), (params, xs, s0, w), (P(), BATCH, P(), BATCH), explicit,
            None),
        "explicit: xs sharded on n_x": (
            grad(wide_loss, (0, 1, 2)), (wide_p, wide_xs, wide_s0),
            (P(), P(None, None, "batch"), P()), explicit, None),
        "explicit: state sharded on n_a": (
            grad(wide_loss, (0, 1, 2)), (wide_p, wide_xs, wide_s0),
            (P(), P(), P(None, "batch")), explicit, None),
    }
    rows = []
    for name, (f, args, specs, on, ref) in cases.items():
        row = {"case": name, "error": None, "grad_rel_err": None}
        try:
            got = f(*put(args, specs, on))
        except Exception as e:  # noqa: BLE001 -- reported, asserted on by the test
            row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
        else:
            row["grad_rel_err"] = rel_err(got, jax.jit(ref or f)(*on_one_device(args)))
        rows.append(row)
    row = {"case": "explicit, set_mesh: jb.stack(init=None)", "error": None, "grad_rel_err": None}

    def stack_loss(p, xs, lengths):
        return jnp.sum(jb.stack(p, xs, lengths=lengths)[0] * stack.w_hs)
    stack_grad = grad(stack_loss, (0, 1))
    args = (stack.params, stack.xs, stack.lengths)
    try:
        with jax.set_mesh(explicit):
            got = stack_grad(*put(args, (jax.tree.map(lambda _: P(), stack.params), BATCH,
                                         P("batch")), explicit))
    except Exception as e:  # noqa: BLE001 -- reported, asserted on by the test
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
    else:
        row["grad_rel_err"] = rel_err(got, stack_grad(*on_one_device(args)))
    return rows + [row]


def vmap_sweeps(mesh, names):
    """Check 4: vmap over ENSEMBLE parameter sets vs a Python loop; then with the batch sharded.

    The sharded sweep runs on a 2-D mesh ('model': 2, 'batch': n_dev / 2): the
    ensemble axis is split over 'model', the batch over 'batch'.
    """
    rows = []
    for name in names:
        pb = Problem(name)
        members = [make(name, T, B, N_X, N_A, seed=100 + e)[1] for e in range(ENSEMBLE)]
        stacked = jax.tree.map(lambda *x: jnp.stack(x), *members)

        def grad_one(params, xs, state0, w_hs, w_final, pb=pb):
            return jax.grad(lambda *a: pb.loss(*a, None, "bptt")[0], argnums=(0, 1, 2))(
                params, xs, state0, w_hs, w_final)

        data = (pb.xs, pb.state0, pb.w_hs, pb.w_final)
        one = jax.jit(grad_one)
        loop = [one(m, *data) for m in members]
        loop = jax.tree.map(lambda *x: jnp.stack(x), *loop)
        sweep = jax.jit(jax.vmap(grad_one, in_axes=(0, None, None, None, None)))
        row = {"model": name, "members": ENSEMBLE,
               "vmap_rel_err": rel_err(sweep(stacked, *data), loop)}

        mesh2 = Mesh(np.array(jax.devices()).reshape(2, -1), ("model", "batch"))
        p_spec, label = P("model"), f"model=2 x batch={mesh.size // 2}"
        sp = put(stacked, jax.tree.map(lambda _: p_spec, stacked), mesh2)
        sd = put(data, (BATCH, pb.state_spec, BATCH, pb.final_spec), mesh2)
        compiled = sweep.lower(sp, *sd).compile()
        got = compiled(sp, *sd)
        dxs = got[1]
        row.update({
            "mesh": label,
            "sharded_rel_err": rel_err(got, loop),
            "dxs_spec": str(dxs.sharding.spec),
            "dxs_sharded": _is(dxs.sharding, mesh2,
                               P("model", None, "batch", None), 4),
            **hlo_summary(compiled, mesh2.shape["batch"]),
        })
        # And on jax.make_mesh's mesh (Explicit axes: the dW accumulator typed unreduced).
        explicit = jax.make_mesh((mesh.size,), ("batch",))
        row["explicit_error"] = row["explicit_rel_err"] = None
        try:
            sp = put(stacked, jax.tree.map(lambda _: P(), stacked), explicit)
            sd = put(data, (BATCH, pb.state_spec, BATCH, pb.final_spec), explicit)
            row["explicit_rel_err"] = rel_err(sweep(sp, *sd), loop)
        except Exception as e:  # noqa: BLE001 -- reported, asserted on by the test
            row["explicit_error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}"
        rows.append(row)
    return rows


def cases(everything=False):
    """The models (and options) each section runs. The suite's default run leaves out
    (for --runslow) what repeats a check of the driver, which treats every cell alike,
    with another cell: the course GRU (its step is all that differs from the cuDNN
    form), a second cell in the ensemble and vmap sweeps, and the autodiff references
    in shard_map with replicated params and on an Explicit mesh."""
    def pick(always, slow):
        return tuple(always) + (tuple(slow) if everything else ())

    return {
        "data_parallel": pick(("rnn", "lstm", "gru-cudnn", "stack"), ("gru-course",)),
        "shard_map": ("rnn", "lstm", "gru-course", "gru-cudnn", "stack"),
        "shard_map_replicated_params": pick(
            (("lstm", "sharded", "bptt"), ("lstm", "None", "bptt"), ("lstm", "zeros", "bptt"),
             ("stack", "None", "bptt")),
            (("lstm", "sharded", "autodiff"), ("lstm", "None", "autodiff"))),
        "shard_map_ensemble": pick(("lstm",), ("rnn", "gru-cudnn")),
        "vmap": pick(("lstm",), ("gru-cudnn",)),
        "explicit_mesh": pick((("lstm", "bptt"), ("lstm:slots", "bptt"), ("stack", "bptt")),
                              (("lstm", "autodiff"), ("gru-course", "bptt"))),
    }


def report(n_dev, everything=False):
    assert len(jax.devices()) == n_dev, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    run = cases(everything)
    return {
        "devices": n_dev, "platform": jax.devices()[0].platform, "jax": jax.__version__,
        "shape": {"T": T, "B": B, "n_x": N_X, "n_a": N_A}, "everything": everything,
        "data_parallel": data_parallel(mesh, run["data_parallel"])
        + data_parallel(mesh, ("lstm:states", "lstm:checkpoint", "lstm:slots"), modes=("bptt",)),
        "shard_map": shard_map_explicit(mesh, run["shard_map"], modes=("bptt",))
        + shard_map_explicit(mesh, ("lstm",), modes=("autodiff",))
        + shard_map_explicit(mesh, ("lstm",), modes=("bptt",), check_vma=False),
        "shard_map_replicated_params": shard_map_replicated_params(
            mesh, run["shard_map_replicated_params"]),
        "shard_map_ensemble": shard_map_ensemble(mesh, run["shard_map_ensemble"]),
        "vmap": vmap_sweeps(mesh, run["vmap"]),
        "other_layouts": other_layouts(mesh),
        "explicit_mesh": explicit_mesh(run["explicit_mesh"]),
    }


# ---------------------------------------------------------------------------- memory

def memory(n_dev, shape=(100, 64, 32, 128)):
    """Per-device bytes of one gradient (float32) on 1 and n_dev devices, for every cell.

    ``residual_bytes``: what ``jax.vjp`` keeps from the forward for the backward
    (the vjp function's array leaves, one device's shard of each), with their
    global ``residual_shapes``. ``argument/output/temp_bytes``: ``memory_analysis()``
    of the compiled ``jit(grad)`` (temp: the peak scratch of the whole step).
    """
    t, b, n_x, n_a = shape
    modes = (("bptt", "gates"), ("bptt", "states"), ("bptt", "checkpoint"), ("autodiff", None))
    cells, counts = ("rnn", "lstm", "gru-course", "gru-cudnn"), sorted({1, n_dev})
    rows = []
    for cell in cells:
        fn, params, xs, s0 = make(cell, t, b, n_x, n_a, dtype=np.float32)
        specs = (jax.tree.map(lambda _: P(), params), BATCH, jax.tree.map(lambda _: ROWS, s0))
        for backward, policy in modes:
            kw = {"residuals": policy} if policy else {}

            def run(params, xs, s0, backward=backward, fn=fn, kw=kw):
                return fn(params, xs, s0, backward=backward, **kw)

            def loss(params, xs, s0, run=run):
                return jnp.sum(run(params, xs, s0)[0] ** 2)

            grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
            for n in counts:
                mesh = Mesh(np.array(jax.devices()[:n]), ("batch",))
                args = put((params, xs, s0), specs, mesh)
                _, vjp = jax.vjp(run, *args)
                saved = [x for x in jax.tree.leaves(vjp) if isinstance(x, jax.Array)]
                m = grad.lower(*args).compile().memory_analysis()
                rows.append({
                    "cell": cell, "backward": backward, "residuals": policy, "devices": n,
                    "residual_bytes": sum(x.addressable_shards[0].data.nbytes for x in saved),
                    "residual_shapes": sorted(str(x.shape) for x in saved if x.size >= b * n_a),
                    "argument_bytes": m.argument_size_in_bytes,
                    "output_bytes": m.output_size_in_bytes,
                    "temp_bytes": m.temp_size_in_bytes})
                print(f"{len(rows)}/{len(cells) * len(modes) * len(counts)}: {cell} {backward} "
                      f"{policy or ''} on {n} device(s)", file=sys.stderr, flush=True)
    return {"shape": {"T": t, "B": b, "n_x": n_x, "n_a": n_a, "dtype": "float32"},
            "rows": rows}


if __name__ == "__main__":
    if ARGS.memory:
        print(json.dumps(memory(ARGS.devices), indent=1))
    else:
        jax.config.update("jax_enable_x64", True)
        jax.config.update("jax_numpy_rank_promotion", "raise")
        print(json.dumps(report(ARGS.devices, ARGS.all)))
