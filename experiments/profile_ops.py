"""Where one forward + backward spends its time, op by op, read from XLA's own profiler.

Traces ``--calls`` calls of the jitted gradient of ``sum(hs · w)`` (params, xs and the
initial state; float32) with ``jax.profiler``, reads the trace back with
``jax.profiler.ProfileData`` and adds up the time of every op of the compiled program
(XLA's CPU runtime runs each op of a loop body as one "thunk" and records it by name).
Each op is classed from the compiled HLO:

  matmul   a dot (XLA's CPU dots are custom fusions calling a GEMM library)
  other    every other op: elementwise fusions, copies, slices, loop counters

and by how many times it runs per call: per step (at least T times), per chunk, or once.
The table lists the ops that take the most time; the summary gives the shares by class, and
the time independent ops of a loop body ran side by side (XLA's CPU runtime starts them on
different cores).
The profiler slows a call down (by up to 30 % here), so compare shares, not totals, with
bench_bptt.py; the untraced median is printed beside them.

Run: python experiments/profile_ops.py [--cell lstm] [--shape 100 32 64 128]
         [--backward bptt|autodiff] [--residuals gates] [--chunk K] [--variant course|cudnn]
         [--out DIR]
Writes results/profile_ops_<cell>_<T>_<B>_<n_x>_<n_a>_<backward>[_<residuals>][_<variant>]
[_chunk<K>].json.
"""

import argparse
import collections
import glob
import re
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
from _common import add_out, at_least, write_json

import jaxbptt as jb

CONTAINERS = ("while", "conditional", "call")  # their time is their body's ops


def _dims(shape):
    m = re.match(r"\w+\[([\d,]*)\]", shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def hlo_ops(text):
    """{op name: (opcode, result type, flops)} of every instruction of a compiled module;
    flops for a dot, or a fusion calling one (2 x result size x contracted size)."""
    lines = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+?(?:\[[^\]]*\](?:\{[^}]*\})?)?"
                         r"|\(.*?\)) ([\w\-]+)\((.*)$", text, re.M):
        lines[m.group(1)] = m.groups()[1:]
    computations = dict(re.findall(r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)^\}", text,
                                   re.M | re.S))

    def dot_flops(shape, rest):
        lhs = re.match(r"%?([\w.\-]+)", rest).group(1)
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
        size = 1
        for d in _dims(shape):
            size *= d
        k = 1
        for i in (contracting.group(1).split(",") if contracting else []):
            k *= _dims(lines[lhs][0])[int(i)]
        return 2 * size * k

    ops = {}
    for name, (shape, opcode, rest) in lines.items():
        flops = None
        if opcode == "dot":
            flops = dot_flops(shape, rest)
        elif opcode == "fusion":
            called = re.search(r"calls=%?([\w.\-]+)", rest)
            body = computations.get(called.group(1), "") if called else ""
            dot = re.search(r"%?[\w.\-]+ = (\S+) dot\((.*)$", body, re.M)
            if dot:
                opcode, flops = "dot", dot_flops(*dot.groups())
        ops[name] = (opcode, shape, flops)
    return ops


def concurrency(spans):
    """The time some op ran (the union of the spans), and the time each pair of ops ran
    side by side: XLA's CPU runtime runs independent ops of a body on different cores."""
    busy, pairs, running, first, end = 0, collections.Counter(), [], None, None
    for start, stop, name in sorted(spans):
        if end is None or start > end:
            busy += 0 if end is None else end - first
            first, end = start, stop
        end = max(end, stop)
        running = [(e, n) for e, n in running if e > start]
        for e, n in running:
            pairs[tuple(sorted((name, n)))] += min(e, stop) - start
        running.append((stop, name))
    return busy + (0 if end is None else end - first), pairs


def build(args):
    T, B, n_x, n_a = args.shape
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    xs = jax.random.normal(k[1], (T, B, n_x), jnp.float32)
    w = jax.random.normal(k[2], (T, B, n_a), jnp.float32)
    a0 = 0.1 * jax.random.normal(k[3], (B, n_a), jnp.float32)
    kw = {"backward": args.backward}
    if args.backward == "bptt":
        kw["residuals"] = args.residuals
    if args.chunk:
        kw["chunk"] = args.chunk
    if args.cell == "lstm":
        params, s0, run = jb.init_lstm(k[0], n_x, n_a), jb.LSTMState(a0, a0), jb.lstm
    elif args.cell == "gru":
        params, s0 = jb.init_gru(k[0], n_x, n_a, variant=args.variant), a0
        run = jb.gru
    else:
        params, s0, run = jb.init_rnn(k[0], n_x, n_a), a0, jb.rnn

    def loss(params, xs, s0, w):  # w an argument: the cotangent of hs is data, as in training
        return jnp.sum(run(params, xs, s0, **kw)[0] * w)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(params, xs, s0, w).compile()
    return (lambda: jax.block_until_ready(compiled(params, xs, s0, w))), compiled


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cell", choices=("lstm", "gru", "rnn"), default="lstm")
    ap.add_argument("--shape", type=at_least(1), nargs=4, default=(100, 32, 64, 128),
                    metavar=("T", "B", "N_X", "N_A"))
    ap.add_argument("--backward", choices=("bptt", "autodiff"), default="bptt")
    ap.add_argument("--residuals", choices=("gates", "states", "checkpoint"), default="gates")
    ap.add_argument("--chunk", type=at_least(1), default=None, help="steps per chunk (the default's if not given)")
    ap.add_argument("--variant", choices=("course", "cudnn"), default="cudnn", help="GRU form")
    ap.add_argument("--calls", type=at_least(1), default=10, help="calls traced (and timed untraced)")
    ap.add_argument("--top", type=at_least(1), default=20, help="ops listed")
    add_out(ap, "JSON file")
    args = ap.parse_args()
    T = args.shape[0]

    call, compiled = build(args)
    ops = hlo_ops(compiled.as_text())
    for _ in range(3):
        call()
    untraced = []
    for _ in range(args.calls):
        t0 = time.perf_counter()
        call()
        untraced.append(time.perf_counter() - t0)

    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(args.calls):
                call()
        trace = jax.profiler.ProfileData.from_file(
            glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
        total, count, spans = collections.Counter(), collections.Counter(), []
        for plane in trace.planes:
            for line in plane.lines:
                for ev in line.events:
                    if ev.name in ops and ops[ev.name][0] not in CONTAINERS:
                        total[ev.name] += ev.duration_ns
                        count[ev.name] += 1
                        spans.append((ev.start_ns, ev.start_ns + ev.duration_ns, ev.name))
    busy_ns, side_by_side = concurrency(spans)

    n = args.calls
    rows = []
    for name, ns in total.most_common():
        per_call = count[name] / n
        flops = ops[name][2]
        rows.append({"op": name, "opcode": ops[name][0], "type": ops[name][1],
                     "runs_per_call": per_call, "us_each": ns / count[name] / 1e3,
                     "gflop_per_s": flops * count[name] / ns if flops else None,
                     "ms_per_call": ns / n / 1e6,
                     "class": ("matmul" if ops[name][0] == "dot" else "other"),
                     "runs": ("per step" if per_call >= T else "once" if per_call == 1
                              else "per chunk")})
    ops_ms = sum(r["ms_per_call"] for r in rows)
    classes = collections.defaultdict(float)
    for r in rows:
        classes[f"{r['class']}, {r['runs']}"] += r["ms_per_call"]
    median_ms = statistics.median(untraced) * 1e3

    label = (f"{args.cell} {tuple(args.shape)} {args.backward}"
             + (f"[{args.residuals}]" if args.backward == "bptt" else "")
             + (f" chunk={args.chunk}" if args.chunk else "")
             + (f" variant={args.variant}" if args.cell == "gru" else ""))
    busy_ms = busy_ns / n / 1e6
    print(f"{label}: {median_ms:.2f} ms per call untraced; traced, the ops took {ops_ms:.2f} ms "
          f"per call, {busy_ms:.2f} ms of it with at least one op running")
    print(f"{'op':36s} {'result':16s} {'class':7s} {'runs/call':>9s} {'us each':>9s} "
          f"{'GFLOP/s':>7s} {'ms/call':>8s} {'share':>6s}")
    for r in rows[: args.top]:
        rate = "" if r["gflop_per_s"] is None else f"{r['gflop_per_s']:.0f}"
        print(f"{r['op'][:36]:36s} {r['type'].split('{')[0][:16]:16s} {r['class']:7s} "
              f"{r['runs_per_call']:9.0f} {r['us_each']:9.2f} {rate:>7s} {r['ms_per_call']:8.3f} "
              f"{100 * r['ms_per_call'] / ops_ms:5.1f}%")
    print()
    for c, ms in sorted(classes.items(), key=lambda kv: -kv[1]):
        print(f"{c:24s} {ms:8.3f} ms per call {100 * ms / ops_ms:5.1f}%")
    print("\nops run side by side (ms per call):")
    overlaps = [{"ops": list(pair), "ms_per_call": ns / n / 1e6}
                for pair, ns in side_by_side.most_common(5) if ns / n / 1e6 >= 0.01]
    for o in overlaps:
        a, b = o["ops"]
        print(f"  {o['ms_per_call']:8.3f}  {a} {ops[a][1].split('{')[0]} & {b} {ops[b][1].split('{')[0]}")
    if not overlaps:
        print("  none for 0.01 ms per call or more")
    name = "_".join([f"profile_ops_{args.cell}", *map(str, args.shape), args.backward]
                    + ([args.residuals] if args.backward == "bptt" else [])
                    + ([args.variant] if args.cell == "gru" else [])
                    + ([f"chunk{args.chunk}"] if args.chunk else []))
    path = write_json(f"{name}.json", {
        "label": label, "args": vars(args), "calls": n, "untraced_median_ms": median_ms,
        "ops_ms_per_call": ops_ms, "busy_ms_per_call": busy_ms,
        "classes_ms_per_call": dict(classes), "side_by_side": overlaps, "ops": rows}, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
