"""The batch split over N host devices of one CPU: what JAX's SPMD engine gains for BPTT there.

XLA's CPU runtime runs one recurrence on one core when its products are small, and runs
nothing beside a loop (RESULTS.md, "Where the time goes"). N simulated host devices
(``--xla_force_host_platform_device_count=N``) run N copies of the program at once, each on
B/N rows: the data-parallel layout of docs/many_devices.md, applied to the cores of one
machine. This script times it, with no change to the code that runs on one device.

For each cell and bench_bptt.py shape, the gradient of loss = sum(hs * w) with respect to
the parameters, xs and the initial state(s), float32, for

  bptt      jaxbptt backward="bptt", default residuals
  autodiff  jaxbptt backward="autodiff"
  scan      the textbook lax.scan, differentiated by JAX (bench_bptt.py's "scan")

each compiled for one device and for N devices (params replicated, xs, w and the states split
on B) on a mesh whose axis is Auto (``<impl>@N``) and one whose axis is Explicit
(``<impl>@N explicit``: sharding in types, where jaxbptt's driver sums the parameter gradients
in one all-reduce after its loops; docs/many_devices.md), and PyTorch's nn.LSTM / GRU / RNN
(if installed; its default thread count). The all-reduces each N-device program executes per
call are counted from its compiled HLO (per loop body, times the loops' trip counts). Runs are
interleaved in a new random order each round; the paired ratios are medians over the rounds
of two times of the same round. The N-device gradients are checked against the one-device
ones (the largest relative difference over the leaves is printed and stored).

Run:  python experiments/host_devices.py [--devices 2] [--runs 15] [--cells lstm,gru,rnn]
      python experiments/host_devices.py --markdown results/host_devices.json  # RESULTS.md's table
Writes results/host_devices.json (about 5 minutes on 2 cores). --devices defaults to the
number of CPUs.
"""

import argparse
import json
import os
import re
import statistics
import sys
import time

from _common import add_out, at_least, write_json  # (imports JAX only when called)


def _cpus():
    try:
        return len(os.sched_getaffinity(0))  # what this process may use (Linux)
    except AttributeError:
        return os.cpu_count() or 1


def _parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=at_least(1), default=_cpus(),
                   help="host devices to split the batch over (default: the CPUs this "
                   "process may run on)")
    p.add_argument("--runs", type=at_least(1), default=15, help="timed rounds per shape (default 15)")
    p.add_argument("--warmup", type=at_least(0), default=2, help="warm-up rounds (default 2)")
    p.add_argument("--cells", default="lstm,gru,rnn", help="comma-separated subset")
    p.add_argument("--markdown", metavar="JSON", default=None,
                   help="print RESULTS.md's table from a stored run (no timing)")
    add_out(p, "JSON file")
    return p.parse_args()


ARGS = _parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # the device count must be in XLA_FLAGS before JAX initialises
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   os.environ.get("XLA_FLAGS", "")).split()
    os.environ["XLA_FLAGS"] = " ".join(
        flags + [f"--xla_force_host_platform_device_count={ARGS.devices}"])
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import _bench_peers as peers  # noqa: E402
from bench_bptt import (SHAPES, Notes, Variant, available_peers, compile_jax,  # noqa: E402
                        gemm_peak, geomean, rel_err, time_interleaved, versions)

IMPLS = ("bptt", "autodiff", "scan")


def _setup(impl, cell, key, n_x, n_a, a0, c0):
    if impl == "scan":
        return peers.scan_setup(cell, key, n_x, n_a, a0, c0)
    return (peers.jaxbptt_fwd(cell, impl), peers.jaxbptt_params(cell, key, n_x, n_a),
            peers.jaxbptt_state(cell, a0, c0))


def variants_for(cell, shape, n, avail, notes):
    """Each implementation on one device (``<impl>``) and on N devices, with the mesh axis
    Auto (``<impl>@N``) and Explicit (``<impl>@N explicit``), each compiled under
    ``jax.set_mesh`` of its mesh; and torch."""
    T, B, n_x, n_a = shape
    k = jax.random.split(jax.random.PRNGKey(0), 6)
    xs = jax.random.normal(k[0], (T, B, n_x))
    a0 = 0.5 * jax.random.normal(k[1], (B, n_a))
    c0 = 0.5 * jax.random.normal(k[2], (B, n_a)) if cell == "lstm" else None
    w = jax.random.normal(k[3], (T, B, n_a))
    meshes = {f"@{n}": jax.make_mesh((n,), ("batch",), axis_types=(AxisType.Auto,)),
              f"@{n} explicit": jax.make_mesh((n,), ("batch",), axis_types=(AxisType.Explicit,))}
    out = []
    for impl in IMPLS:
        fwd, params, s0 = _setup(impl, cell, k[4], n_x, n_a, a0, c0)
        out.append(compile_jax(impl, fwd, params, xs, s0, w))
        for suffix, mesh in meshes.items():
            rows = NamedSharding(mesh, P(None, "batch", None))  # (T, B, .)
            states = NamedSharding(mesh, P("batch", None))  # (B, n_a)
            args = (jax.device_put(params, NamedSharding(mesh, P())), jax.device_put(xs, rows),
                    jax.device_put(s0, states), jax.device_put(w, rows))
            try:
                with jax.set_mesh(mesh):
                    out.append(compile_jax(impl + suffix, fwd, *args))
            except Exception as e:  # noqa: BLE001 - a peer that does not trace there
                notes.add(f"{cell} {impl}{suffix}: {type(e).__name__}: "
                          f"{str(e).strip().splitlines()[0][:160]}")
    if avail.get("torch"):
        params = peers.jaxbptt_params(cell, k[4], n_x, n_a)
        out.append(Variant("torch", "torch", peers.torch_setup(cell, params, xs, a0, c0, w)))
    return out


def all_reduces(compiled):
    """All-reduces one call executes, from the compiled HLO text: those of each computation
    times the trip counts of the while loops around it (XLA's ``known_trip_count``; None if
    a loop has none). A computation reached otherwise (a call, a conditional's branch) counts
    once."""
    count, parent, trips, comp = {}, {}, {}, None
    for line in compiled.as_text().splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            comp = "ENTRY" if line.startswith("ENTRY") else line.split()[0]
        elif re.search(r" all-reduce(-start)?\(", line):
            count[comp] = count.get(comp, 0) + 1
        elif " while(" in line:
            body = re.search(r"body=(%?[\w.\-]+)", line)
            n = re.search(r'"n":"(\d+)"', line)
            if body:
                parent[body.group(1)] = comp
                trips[body.group(1)] = int(n.group(1)) if n else None
    total = 0
    for c, k in count.items():
        while c in parent:
            if trips[c] is None:
                return None  # a loop of unknown length
            k, c = k * trips[c], parent[c]
        total += k
    return total


def paired(times, num, den):
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def main():
    args = ARGS
    if args.markdown:
        with open(args.markdown) as f:
            data = json.load(f)
        print(markdown(data["results"], data["devices"]))
        return
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    n = args.devices
    if n < 2:
        sys.exit(f"--devices {n}: nothing to split the batch over; pass --devices 2 or more")
    if len(jax.devices()) < n:
        sys.exit(f"asked for {n} devices, JAX has {len(jax.devices())}")
    if not any(shape[1] % n == 0 for cell in cells for shape in SHAPES[cell]):
        sys.exit(f"--devices {n} divides no benchmark batch size "
                 f"{sorted({s[1] for c in cells for s in SHAPES[c]})}; pass --devices 2")
    notes = Notes()
    avail = available_peers(notes)
    torch_threads = None
    if avail.get("torch"):
        import torch

        torch_threads = torch.get_num_threads()
    print(f"{n} host devices on {_cpus()} CPUs; torch threads {torch_threads}; runs "
          f"{args.runs}, warm-up {args.warmup}; "
          + ", ".join(f"{k} {v}" for k, v in versions(avail).items()), flush=True)
    t0 = time.perf_counter()
    # the machine's state, as bench_bptt.py records it: a slow spell shows in both
    load0, gemm0 = os.getloadavg(), gemm_peak()
    print(f"GEMM {gemm0['gflops']:.0f} GFLOP/s on one device; load average {load0[0]:.2f}",
          flush=True)
    results = {}
    for cell in cells:
        rows = []
        for shape in SHAPES[cell]:
            if shape[1] % n:
                notes.add(f"{cell} {shape}: B not divisible by {n}, skipped")
                continue
            print(f"[{cell} {shape}] compiling ...", flush=True)
            variants = variants_for(cell, shape, n, avail, notes)
            times, _ = time_interleaved(variants, args.runs, args.warmup)
            rows.append(summarize(cell, shape, variants, times))
            r = rows[-1]
            print("  " + "  ".join(f"{k} {v:.1f}" for k, v in r["median_ms"].items()) + " ms")
            print("  paired: " + "  ".join(f"{k} {v:.2f}" for k, v in r["paired"].items()))
            print("  gradients against one device (max rel. diff): " + "  ".join(
                f"{k} {v:.1e}" for k, v in r["grad_rel_diff"].items()))
            print("  all-reduces per call: " + "  ".join(
                f"{k} {v}" for k, v in r["all_reduces"].items()), flush=True)
        results[cell] = rows
    gemm1, load1 = gemm_peak(), os.getloadavg()
    print(f"\n{markdown(results, n)}")
    print(f"\nGEMM {gemm0['gflops']:.0f} -> {gemm1['gflops']:.0f} GFLOP/s; load average "
          f"{load0[0]:.2f} -> {load1[0]:.2f}")
    path = write_json("host_devices.json", {
        "devices": n, "runs": args.runs, "versions": versions(avail), "notes": notes.items,
        "torch_threads": torch_threads, "gemm_start": gemm0, "gemm_end": gemm1,
        "loadavg_start": load0, "loadavg_end": load1, "results": results}, args.out)
    print(f"\nwrote {path} in {time.perf_counter() - t0:.0f} s")


def summarize(cell, shape, variants, times):
    """Medians, paired ratios (each N-device variant against the same code on one device;
    bptt against autodiff on one device and against torch), gradient differences and the
    all-reduces of each N-device program."""
    by = {v.name: v for v in variants}
    multi = [k for k in by if "@" in k]
    pairs = [(k, k.split("@")[0]) for k in multi]
    pairs += [(k, "autodiff") for k in ["bptt"] + [m for m in multi if m.startswith("bptt")]]
    if "torch" in by:
        pairs += [(k, "torch") for k in ["bptt"] + [m for m in multi if m.startswith("bptt")]]
    return {"cell": cell, "T": shape[0], "B": shape[1], "n_x": shape[2], "n_a": shape[3],
            "median_ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
            "paired": {f"{a} / {b}": paired(times, a, b) for a, b in pairs},
            "grad_rel_diff": {k: rel_err(jax.device_get(by[k].out),
                                         jax.device_get(by[k.split("@")[0]].out))
                              for k in multi},
            "all_reduces": {k: all_reduces(by[k].compiled) for k in multi},
            "times_s": times}


def markdown(results, n):
    """RESULTS.md's table: paired ratios per shape and their geometric mean per cell."""
    auto, expl = f"@{n}", f"@{n} explicit"
    keys = [f"{i}{m} / {i}" for i in IMPLS for m in (auto, expl)]
    keys += [f"bptt{expl} / autodiff", "bptt / torch", f"bptt{expl} / torch"]
    head = [f"{i} {'Auto' if m == auto else 'Explicit'} ×1 dev" for i in IMPLS
            for m in (auto, expl)] + ["bptt Explicit ×autodiff (1 dev)", "bptt ×torch",
                                      "bptt Explicit ×torch"]
    out = [f"| cell | T, B, n_x, n_a | bptt ms: 1 dev, {n} Auto, {n} Explicit | "
           + " | ".join(head) + " |", "|" + "---|" * (len(keys) + 3)]
    fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    for cell, rows in results.items():
        for r in rows:
            ms = r["median_ms"]
            out.append(f"| {cell.upper()} | {r['T']}, {r['B']}, {r['n_x']}, {r['n_a']} | "
                       + ", ".join("–" if ms.get(k) is None else f"{ms[k]:.1f}"
                                   for k in ("bptt", f"bptt{auto}", f"bptt{expl}")) + " | "
                       + " | ".join(fmt(r["paired"].get(k)) for k in keys) + " |")
        if len(rows) > 1:
            vals = [geomean([x["paired"][k] for x in rows])
                    if all(k in x["paired"] for x in rows) else None for k in keys]
            out.append(f"| {cell.upper()} | geometric mean | | "
                       + " | ".join(fmt(v) for v in vals) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
