"""Forward + backward time and XLA memory of jaxbptt's BPTT against autodiff, remat and peers.

Peers: pip install -e ".[bench]"   (Flax, Equinox, matplotlib) and PyTorch's CPU build,
      torch==2.13.0 (README, Install)
Run:  python experiments/bench_bptt.py            # full run, ~12-15 min on 2 cores
      python experiments/bench_bptt.py --quick    # about 2 min smoke run (3 runs, small shapes)
      python experiments/bench_bptt.py --resummarize results/bench_bptt.json  # ratios from stored times
      python experiments/bench_bptt.py --markdown results/bench_bptt.json  # RESULTS.md's tables
      python experiments/bench_bptt.py --plot results/bench_bptt.json  # redraw its PNG
      options: --cells lstm,gru,rnn  --runs N  --warmup N  --sweep-T 64,256,1024,4096
               --sweep-time-max-T 4096 (1024 skips timing the longest, ~-5 min)  --no-sweep
               --torch-threads N (default: PyTorch's own default, reported)  --out DIR

For each cell (RNN, LSTM, GRU in its cuDNN form) and shape (T, B, n_x, n_a) it times the
gradient of loss = sum(hs * w) with respect to the parameters, the inputs xs and the initial
state(s), float32, for:

  bptt[<policy>]  jaxbptt backward="bptt", one row per jaxbptt.RESIDUAL_POLICIES entry
                  (a single "bptt" row when the library has no such attribute)
  autodiff        jaxbptt backward="autodiff": JAX's derivative of the same lax.scan forward
  scan            the textbook lax.scan a user would write: each step's gates from [a; x]
                  (one matmul in the loop), jax.nn.sigmoid, autodiff; often leaner and
                  faster than the hoisted form above, so both are reference points
  remat           autodiff's hoisted form (the projection before the loop), with
                  jax.checkpoint around the step
  flax            flax.linen nn.RNN(OptimizedLSTMCell / GRUCell / SimpleCell), time_major
  equinox         eqx.nn.LSTMCell / GRUCell, vmapped over the batch, scanned over time
  products        not a gradient: the matmuls of bptt[gates]'s layout alone (per chunk the
                  input projection and dWh, dWx, dx; per step the recurrent product forward
                  and backward), the cell's elementwise work cut to a tanh forward and a
                  tile-and-multiply backward: what XLA takes for the model FLOPs in that
                  layout (_bench_peers.products_setup)
  products[steps] the per-step products alone, forward and backward (2 n_a / (3 (n_x + n_a))
                  of the model FLOPs): the serial part, which no layout can batch; its
                  GFLOP/s and % peak count these FLOPs only
  torch           PyTorch nn.LSTM / GRU / RNN on the CPU, autograd (default thread count);
                  its nn.LSTM runs oneDNN's fused RNN primitive
  torch-aten      (LSTM) the same nn.LSTM with oneDNN switched off: PyTorch's ATen path, a
                  GEMM per step and separate elementwise kernels, as its GRU and RNN always run

JAX variants are jax.jit(jax.grad(loss, argnums=(0, 1, 2))), compiled once ahead of time
(the same executable gives the XLA temp memory and is timed). Method: one process, warm-up,
then rounds over the variants of a shape, each round in a new random order (PyTorch gets a
pause after each call: its spinning OpenMP threads would slow whatever follows); median and min.
Ratios: of the medians (x_autodiff, x_scan, x_torch), and paired (x_*_paired, also against
torch-aten): the median over the rounds of the two times of the same round, with its quartiles.
"faulted" is the median memory the kernel mapped and zeroed during a call (minor page faults
times the page size): under glibc's default malloc settings a temp buffer of 32 MiB or more is
mapped afresh on every call, smaller ones are reused. Started with glibc told to keep what it
frees (MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=17179869184), no call
faults, and every JAX variant with a large temp buffer runs faster, autodiff most of all
(experiments/cpu_limits.py measures the faults; the JSON records the MALLOC_* settings).
A 2048^3 float32 matmul under jit, timed at the start and at the end, gives the GEMM peak;
the model FLOP rate is 3 * 2*T*B*(n_x+n_a)*G*n_a / time (G = 4 LSTM, 3 GRU, 1 RNN).
A sweep over T (LSTM, B=32, n_x=64, n_a=128) gives temp memory (compile only) and time, with
more checkpointing variants: nested (chunk=(64, 8)) and m slots (Gruslys et al.; K=8, m=84
and K=2, m=18).

Writes results/bench_bptt.json and results/bench_memory_vs_T.png
(with --quick: bench_bptt_quick.json and bench_memory_vs_T_quick.png, not to clobber a full run).
"""

import argparse
import importlib
import json
import math
import os
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import _bench_peers as peers
import jaxbptt
from _common import add_out, at_least, int_list, machine, paired_ratio, write_json

GATES = {"lstm": 4, "gru": 3, "rnn": 1}
SHAPES = {
    "lstm": [(100, 32, 64, 128), (100, 32, 64, 256), (200, 64, 128, 512), (50, 64, 128, 512)],
    "gru": [(100, 32, 64, 128), (100, 32, 64, 256), (50, 64, 128, 512)],
    "rnn": [(100, 32, 64, 128), (100, 32, 64, 256), (50, 64, 128, 512)],
}
QUICK_SHAPES = {
    "lstm": [(50, 16, 32, 64)],
    "gru": [(50, 16, 32, 64)],
    "rnn": [(50, 16, 32, 64)],
}
SWEEP_SHAPE = (32, 64, 128)  # B, n_x, n_a of the T sweep (LSTM)
SWEEP_CHECKPOINTS = {  # more "checkpoint" variants in the T sweep: label -> keywords
    "checkpoint 64/8": dict(chunk=(64, 8)),  # nested: chunks of 64 steps, sub-chunks of 8
    "checkpoint 8, 84 slots": dict(chunk=8, slots=84),  # Gruslys et al.'s schedule
    "checkpoint 2, 18 slots": dict(chunk=2, slots=18),
}
QUICK_SWEEP_SHAPE = (8, 16, 32)
MiB = 2.0**20
PAGE = resource.getpagesize()


def model_flops(cell, T, B, n_x, n_a):
    """Forward + backward: 3 x the forward's 2*T*B*(n_x+n_a)*G*n_a."""
    return 3 * 2 * T * B * (n_x + n_a) * GATES[cell] * n_a


def step_flops(cell, T, B, n_x, n_a):
    """The per-step products, forward and backward: 2 * 2*T*B*n_a*G*n_a."""
    return 2 * 2 * T * B * n_a * GATES[cell] * n_a


class Notes:
    """Skips and failures, each said once."""

    def __init__(self):
        self.items = []

    def add(self, msg):
        if msg not in self.items:
            self.items.append(msg)
            print(f"  note: {msg}", flush=True)


def gemm_peak(runs=7, n=2048):
    ka, kb = jax.random.split(jax.random.PRNGKey(1))
    a = jax.random.normal(ka, (n, n), jnp.float32)
    b = jax.random.normal(kb, (n, n), jnp.float32)
    f = jax.jit(jnp.matmul).lower(a, b).compile()
    for _ in range(2):
        f(a, b).block_until_ready()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        ts.append(time.perf_counter() - t0)
    med = statistics.median(ts)
    return {"n": n, "runs": runs, "median_ms": 1e3 * med, "min_ms": 1e3 * min(ts),
            "gflops": 2 * n**3 / med / 1e9}


def available_peers(notes):
    avail = {}
    for name, module in (("flax", "flax.linen"), ("equinox", "equinox"), ("torch", "torch")):
        try:
            importlib.import_module(module)
            avail[name] = True
        except ImportError:
            avail[name] = False
            notes.add(f"{name} is not installed: its rows are skipped")
    return avail


def versions(avail):
    out = {"jax": jax.__version__, "jaxbptt": getattr(jaxbptt, "__version__", "?"),
           "numpy": np.__version__}
    for name, module in (("flax", "flax"), ("equinox", "equinox"), ("torch", "torch")):
        if avail.get(name):
            out[name] = importlib.import_module(module).__version__
    return out


class Variant:
    def __init__(self, name, kind, run, temp_bytes=None, compiled=None):
        self.name, self.kind, self.run, self.temp_bytes = name, kind, run, temp_bytes
        self.compiled = compiled  # the XLA executable (JAX variants)
        self.out = None  # what the first warm-up run returned (the gradients)


def compile_jax(name, fwd, params, xs, state0, w):
    def loss(p, xs, s0, w):
        return jnp.sum(fwd(p, xs, s0) * w)

    return compiled_variant(name, jax.grad(loss, argnums=(0, 1, 2)), params, xs, state0, w)


def compiled_variant(name, fn, *args):
    """``fn`` jitted and compiled for ``args`` ahead of time, with its XLA temp memory."""
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    temp = None if mem is None else int(mem.temp_size_in_bytes)
    return Variant(name, "jax", lambda: jax.block_until_ready(compiled(*args)), temp, compiled)


def build_variants(cell, shape, policies, avail, notes, *, with_peers_time=True, checkpoints=None,
                   products=True):
    """Every variant of one (cell, shape), JAX ones compiled; torch only if with_peers_time;
    ``checkpoints``: more "checkpoint" variants, label -> keywords; "products" only if
    ``products``."""
    T, B, n_x, n_a = shape
    k = jax.random.split(jax.random.PRNGKey(0), 6)
    xs = jax.random.normal(k[0], (T, B, n_x), jnp.float32)
    a0 = 0.5 * jax.random.normal(k[1], (B, n_a), jnp.float32)
    c0 = 0.5 * jax.random.normal(k[2], (B, n_a), jnp.float32) if cell == "lstm" else None
    w = jax.random.normal(k[3], (T, B, n_a), jnp.float32)
    params = peers.jaxbptt_params(cell, k[4], n_x, n_a)
    s0 = peers.jaxbptt_state(cell, a0, c0)

    specs = []
    if policies is None:
        specs.append(("bptt", lambda: (peers.jaxbptt_fwd(cell, "bptt"), params, s0)))
    else:
        for pol in policies:
            specs.append((f"bptt[{pol}]",
                          lambda pol=pol: (peers.jaxbptt_fwd(cell, "bptt", pol), params, s0)))
    if policies is not None and "checkpoint" in policies:
        for label, kw in (checkpoints or {}).items():
            specs.append((f"bptt[{label}]", lambda kw=kw: (
                peers.jaxbptt_fwd(cell, "bptt", "checkpoint", **kw), params, s0)))
    specs.append(("autodiff", lambda: (peers.jaxbptt_fwd(cell, "autodiff"), params, s0)))
    specs.append(("scan", lambda: peers.scan_setup(cell, k[4], n_x, n_a, a0, c0)))
    specs.append(("remat", lambda: peers.remat_setup(cell, k[4], n_x, n_a, a0, c0)))
    if avail.get("flax"):
        specs.append(("flax", lambda: peers.flax_setup(cell, params, a0, c0)))
    if avail.get("equinox"):
        specs.append(("equinox", lambda: peers.equinox_setup(cell, params, n_x, n_a, a0, c0)))

    if products:
        specs.append(("products", lambda: peers.products_setup(cell, k[5], T, B, n_x, n_a, a0, w)))
        specs.append(("products[steps]", lambda: peers.products_setup(
            cell, k[5], T, B, n_x, n_a, a0, w, steps_only=True)))

    variants = []
    for name, setup in specs:
        try:
            if name.startswith("products"):
                fn, weights = setup()
                variants.append(compiled_variant(name, fn, *weights, xs, a0, w))
                continue
            fwd, p, s = setup()
            variants.append(compile_jax(name, fwd, p, xs, s, w))
        except peers.Unsupported as e:
            notes.add(f"{cell}: {name} skipped ({e})")
        except Exception as e:  # noqa: BLE001 - report and go on with the other variants
            msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            notes.add(f"{cell} {shape} {name}: failed ({type(e).__name__}: {msg})")
    if with_peers_time and avail.get("torch"):
        variants.append(Variant("torch", "torch", peers.torch_setup(cell, params, xs, a0, c0, w)))
        if cell == "lstm":  # PyTorch's GRU and RNN have no oneDNN path: the same as "torch"
            variants.append(Variant("torch-aten", "torch", peers.torch_setup(
                cell, params, xs, a0, c0, w, onednn=False)))
    return variants


TORCH_SETTLE_S = 0.05  # PyTorch's OpenMP threads spin after a call; let them stop first


def time_interleaved(variants, runs, warmup):
    """Warm-up rounds, then ``runs`` rounds, each in a new random order; seconds.

    A fixed cyclic order would always time the same variant right after PyTorch,
    whose OpenMP worker threads keep spinning for a while after each call and
    steal one of the two cores (measured: that variant ran 15 % slower). So the
    order is shuffled every round and nothing is timed in the first
    ``TORCH_SETTLE_S`` after a PyTorch run.

    Returns ``(times, faults)``: per variant, the seconds and the minor page faults
    of each timed call (fresh memory the kernel had to map and zero during it).
    """
    for i in range(max(1, warmup)):
        for v in variants:
            out = v.run()
            if i == 0:
                v.out = out
    times = {v.name: [] for v in variants}
    faults = {v.name: [] for v in variants}
    rng = np.random.default_rng(0)
    for _ in range(runs):
        for j in rng.permutation(len(variants)):
            v = variants[j]
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            v.run()
            times[v.name].append(time.perf_counter() - t0)
            faults[v.name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
            if v.kind == "torch":
                time.sleep(TORCH_SETTLE_S)
    return times, faults


def rel_err(got, ref):
    """max over leaves of max|got - ref| / max|ref| (as ``jaxbptt check``)."""
    errs = jax.tree.map(lambda g, r: float(jnp.max(jnp.abs(g - r)) / (jnp.max(jnp.abs(r)) + 1e-30)),
                        got, ref)
    errs = jax.tree.leaves(errs)
    return float("inf") if not all(map(math.isfinite, errs)) else max(errs)


PEERS = ("flax", "equinox", "torch", "torch-aten")  # their own params: not jaxbptt's layout


def input_grads(cell, v):
    """A peer's gradients of xs and of the initial state, as jaxbptt's (dxs, dstate0)."""
    if v.kind == "torch":
        dxs, *ds = [jnp.asarray(t.numpy()) for t in v.out]
        ds = [s[0] for s in ds]  # h0 (and c0) have a leading layer axis
    else:
        _, dxs, ds = v.out
        ds = list(ds) if cell == "lstm" else [ds]
        if v.name == "flax" and cell == "lstm":  # Flax's carry is (c, h)
            ds = ds[::-1]
    return dxs, (jaxbptt.LSTMState(*ds) if cell == "lstm" else ds[0])


def summarize(cell, shape, variants, times, faults, peak_gflops):
    T, B, n_x, n_a = shape
    by = {v.name: v for v in variants}
    med = {name: statistics.median(ts) for name, ts in times.items() if ts}
    ref_t, torch_t, scan_t = med.get("autodiff"), med.get("torch"), med.get("scan")
    ref_mem = by["autodiff"].temp_bytes if "autodiff" in by else None
    scan_mem = by["scan"].temp_bytes if "scan" in by else None
    rows = []
    for v in variants:
        ts = times.get(v.name, [])
        flops = (step_flops if v.name == "products[steps]" else model_flops)(cell, *shape)
        row = {"cell": cell, "T": T, "B": B, "n_x": n_x, "n_a": n_a, "variant": v.name,
               "model_gflop": flops / 1e9,
               "temp_mib": None if v.temp_bytes is None else v.temp_bytes / MiB,
               "mem_x_autodiff": (v.temp_bytes / ref_mem
                                  if v.temp_bytes is not None and ref_mem else None),
               "mem_x_scan": (v.temp_bytes / scan_mem
                              if v.temp_bytes is not None and scan_mem else None)}
        if ts:
            m = statistics.median(ts)
            row.update({"median_ms": 1e3 * m, "min_ms": 1e3 * min(ts),
                        "times_ms": [1e3 * t for t in ts], "gflops": flops / m / 1e9,
                        "pct_gemm_peak": 100 * flops / m / 1e9 / peak_gflops,
                        "x_autodiff": m / ref_t if ref_t else None,
                        "x_scan": m / scan_t if scan_t else None,
                        "x_torch": m / torch_t if torch_t else None,
                        "faulted_mib": statistics.median(faults[v.name]) * PAGE / MiB})
        ref = by.get("autodiff")
        if v.out is not None and ref is not None and ref.out is not None:
            if v.name.startswith("bptt") or v.name in ("remat", "scan"):
                row["grad_rel_err_vs_autodiff"] = rel_err(v.out, ref.out)
            elif v.name in PEERS:  # the same weights: the inputs' and initial state's gradients
                row["grad_rel_err_vs_autodiff"] = rel_err(input_grads(cell, v), ref.out[1:])
        rows.append(row)
    for v in variants:
        v.out = None
    return paired(rows)


PAIRED_REFS = ("autodiff", "scan", "torch", "torch-aten")


def paired(rows):
    """Adds to each row of one shape ``x_<ref>_paired``: the median over the rounds of its
    time divided by the reference's time in the same round, and the quartiles of those
    ratios (``x_<ref>_paired_iqr``). Ratios taken side by side are moved less by a slow spell
    of a shared machine than the ratio of two medians (``x_<ref>``)."""
    times = {r["variant"]: r["times_ms"] for r in rows if r.get("times_ms")}
    for r in rows:
        ts = times.get(r["variant"])
        for ref in PAIRED_REFS:
            if not ts or len(times.get(ref, ())) != len(ts):
                continue
            r[f"x_{ref}_paired"], r[f"x_{ref}_paired_iqr"] = paired_ratio(ts, times[ref])
    return rows


def resummarize(path):
    """Recomputes the paired ratios and the geometric means of a stored run from its times."""
    with open(path) as f:
        data = json.load(f)
    for cell, rows in data["results"].items():
        for shape in dict.fromkeys((r["T"], r["B"], r["n_x"], r["n_a"]) for r in rows):
            paired([r for r in rows if (r["T"], r["B"], r["n_x"], r["n_a"]) == shape])
        data["geomeans"][cell] = geomeans(rows)
        print_table(cell, rows)
        print_geomeans(cell, data["geomeans"][cell])
    sweep = data.get("sweep", {}).get("rows", [])
    for T in dict.fromkeys(r["T"] for r in sweep):
        paired([r for r in sweep if r["T"] == T])
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
    print(f"\nrewrote {path}")


def _md(x, spec):
    return "–" if x is None else f"{x:{spec}}"


def markdown(path):
    """RESULTS.md's tables, from a stored run: the LSTM's rows, the geometric means of
    every cell, and the T sweep (memory and time)."""
    with open(path) as f:
        data = json.load(f)
    out = ["**LSTM**", "",
           "| T, B, n_x, n_a | variant | ms | ×autodiff | ×scan | ×torch | % peak | temp MiB "
           "| mem ×ad | mem ×scan | faulted MiB | paired ×autodiff | paired ×torch "
           "| paired ×torch-aten |", "|" + "---|" * 14]
    last = None
    for r in data["results"].get("lstm", []):
        shape = f"{r['T']}, {r['B']}, {r['n_x']}, {r['n_a']}"
        name = r["variant"] + (" (default)" if r["variant"] == "bptt[gates]" and last is None
                               else "")
        out.append("| " + " | ".join([
            shape if shape != last else "", name, _md(r.get("median_ms"), ".1f"),
            *(_md(r.get(k), ".2f") for k in ("x_autodiff", "x_scan", "x_torch")),
            _md(r.get("pct_gemm_peak"), ".0f"), _md(r.get("temp_mib"), ".1f"),
            _md(r.get("mem_x_autodiff"), ".2f"), _md(r.get("mem_x_scan"), ".2f"),
            _md(r.get("faulted_mib"), ".1f"),
            *(_paired_text(r, ref, dash="–") for ref in ("autodiff", "torch", "torch-aten"))])
            + " |")
        last = shape
    out += ["", "**Geometric means over the shapes**", "",
            "| cell | variant | ×autodiff | ×scan | ×torch | paired ×autodiff | paired ×scan "
            "| paired ×torch | paired ×torch-aten | % GEMM peak | mem ×autodiff | mem ×scan |",
            "|" + "---|" * 12]
    for cell, gm in data["geomeans"].items():
        for name, g in gm.items():
            out.append(f"| {cell.upper()} | {name} | " + " | ".join(
                _md(g.get(k), ".0f" if k == "pct_gemm_peak" else ".2f") for k in (
                    "x_autodiff", "x_scan", "x_torch", "x_autodiff_paired", "x_scan_paired",
                    "x_torch_paired", "x_torch-aten_paired", "pct_gemm_peak",
                    "mem_x_autodiff", "mem_x_scan")) + " |")
    for cell, rows in data["results"].items():
        out += bounds_markdown(cell, rows, data["gemm_peak_gflops_used"])
    sweep = data.get("sweep", {})
    rows, Ts = sweep.get("rows", []), sweep.get("T", [])
    get = {(r["variant"], r["T"]): r for r in rows}
    for key, label, spec in (("temp_mib", "XLA temp MiB", ".1f"), ("median_ms", "median ms", ".1f")):
        out += ["", f"| {label} | " + " | ".join(f"T={T}" for T in Ts) + " |",
                "|" + "---|" * (len(Ts) + 1)]
        for name in dict.fromkeys(r["variant"] for r in rows):
            cells = [_md(get.get((name, T), {}).get(key), spec) for T in Ts]
            if any(c != "–" for c in cells):
                out.append(f"| {name} | " + " | ".join(cells) + " |")
    try:
        print("\n".join(out))
    except BrokenPipeError:  # the reader stopped early (| head): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def product_bounds(rows, peak_gflops):
    """Per shape of one cell, an estimate of the least time its matmuls allow on XLA's CPU
    runtime, which runs nothing beside a loop (cpu_limits.py): the per-step products as
    timed (``products[steps]``; each of the 2 T waits on the one before), plus the rest of
    the model FLOPs (the per-chunk products) at the GEMM rate of the run, with no
    elementwise work beyond that of ``products[steps]``. Against autodiff and PyTorch as
    paired medians (each round's bound over the same round's time), and the default's and
    the ``products`` variant's time over the bound (paired)."""
    out = []
    for shape in dict.fromkeys((r["T"], r["B"], r["n_x"], r["n_a"]) for r in rows):
        by = {r["variant"]: r for r in rows if (r["T"], r["B"], r["n_x"], r["n_a"]) == shape}
        steps = by.get("products[steps]", {}).get("times_ms")
        if not steps:
            continue
        cell = by["products[steps]"]["cell"]
        rest_ms = (model_flops(cell, *shape) - step_flops(cell, *shape)) / peak_gflops / 1e6
        bound = [t + rest_ms for t in steps]

        def ratio(name, inverse=False):
            ts = by.get(name, {}).get("times_ms")
            if not ts or len(ts) != len(bound):
                return None
            return statistics.median([(t / b) if inverse else (b / t) for b, t in zip(bound, ts)])

        b = statistics.median(bound)
        out.append({"shape": shape, "steps_ms": statistics.median(steps), "rest_ms": rest_ms,
                    "bound_ms": b, "x_autodiff": ratio("autodiff"), "x_torch": ratio("torch"),
                    "pct_gemm_peak": 100 * model_flops(cell, *shape) / b / 1e6 / peak_gflops,
                    "default_x_bound": ratio("bptt[gates]", inverse=True),
                    "products_x_bound": ratio("products", inverse=True)})
    return out


def bounds_markdown(cell, rows, peak_gflops):
    """`product_bounds` of one cell as a markdown table (no lines without products[steps])."""
    bounds = product_bounds(rows, peak_gflops)
    if not bounds:
        return []
    keys = ("x_autodiff", "x_torch", "pct_gemm_peak", "products_x_bound", "default_x_bound")
    spec = {k: ".0f" if k == "pct_gemm_peak" else ".2f" for k in keys}
    out = ["", f"**What the products allow, {cell.upper()}** (paired medians)", "",
           "| T, B, n_x, n_a | step products ms | the rest at GEMM peak ms | bound ms "
           "| bound ×autodiff | bound ×torch | bound % peak | products ×bound "
           "| default ×bound |", "|" + "---|" * 9]
    for b in bounds:
        out.append(f"| {', '.join(map(str, b['shape']))} | " + " | ".join(
            [_md(b[k], ".1f") for k in ("steps_ms", "rest_ms", "bound_ms")]
            + [_md(b[k], spec[k]) for k in keys]) + " |")
    gm = {k: geomean([b[k] for b in bounds]) for k in keys}
    out.append("| geometric mean | | | | " + " | ".join(_md(gm[k], spec[k]) for k in keys) + " |")
    return out


def fmt(x, spec, width):
    """``x`` right-aligned in ``width``, always after a space: a value too wide for its
    column pushes the row along rather than running into the column before."""
    return " " + (f"{'-':>{width - 1}}" if x is None else f"{x:>{width - 1}{spec}}")


def _paired_text(r, ref, dash="-"):
    """"median (quartile-quartile)" of the paired ratio against ``ref``; ``dash`` if none."""
    m, iqr = r.get(f"x_{ref}_paired"), r.get(f"x_{ref}_paired_iqr")
    return dash if m is None else f"{m:.2f} ({iqr[0]:.2f}{dash}{iqr[1]:.2f})"


def print_table(cell, rows):
    title = f"{cell.upper()}" + (" (cuDNN form)" if cell == "gru" else "")
    head = (f"{'T, B, n_x, n_a':<20}{'variant':<20}{'median ms':>10}{'min ms':>10}"
            f"{'×autodiff':>10}{'×scan':>7}{'×torch':>8}{'% peak':>8}{'temp MiB':>10}"
            f"{'mem ×ad':>9}{'mem ×scan':>10}{'faulted':>9}{'×ad paired':>20}{'×torch paired':>20}"
            f"{'×aten paired':>20}")
    print(f"\n{title}: forward + backward, grads for params, xs, initial state\n{head}\n"
          + "-" * len(head))
    last = None
    for r in rows:
        shape = f"{r['T']}, {r['B']}, {r['n_x']}, {r['n_a']}"
        if last is not None and shape != last:
            print()
        print(f"{shape if shape != last else '':<20}{r['variant']:<20}"
              + fmt(r.get("median_ms"), ".2f", 10) + fmt(r.get("min_ms"), ".2f", 10)
              + fmt(r.get("x_autodiff"), ".2f", 10) + fmt(r.get("x_scan"), ".2f", 7)
              + fmt(r.get("x_torch"), ".2f", 8)
              + fmt(r.get("pct_gemm_peak"), ".1f", 8) + fmt(r.get("temp_mib"), ".2f", 10)
              + fmt(r.get("mem_x_autodiff"), ".2f", 9) + fmt(r.get("mem_x_scan"), ".2f", 10)
              + fmt(r.get("faulted_mib"), ".1f", 9)
              + "".join(f" {_paired_text(r, ref):>19}" for ref in ("autodiff", "torch", "torch-aten")))
        last = shape
    errs = [(r["variant"], r["grad_rel_err_vs_autodiff"]) for r in rows
            if "grad_rel_err_vs_autodiff" in r]
    if errs:
        worst = {}
        for name, e in errs:
            worst[name] = max(e, worst.get(name, 0.0))
        print("gradient check vs autodiff (max rel. error over shapes; the peers' of xs and\n"
              "the initial state, with the same weights): "
              + ", ".join(f"{n} {e:.1e}" for n, e in worst.items()))


GEOMEAN_KEYS = ("x_autodiff", "x_scan", "x_torch", "pct_gemm_peak", "mem_x_autodiff",
                "mem_x_scan", "x_autodiff_paired", "x_scan_paired", "x_torch_paired",
                "x_torch-aten_paired")


def geomean(values):
    """The geometric mean of ``values``; None if any is missing (None or 0)."""
    return float(np.exp(np.mean(np.log(values)))) if all(values) else None


def geomeans(rows):
    """Per variant, the geometric mean over the shapes of each ratio (the goals' measure)."""
    out = {}
    for name in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == name]
        out[name] = {k: geomean([r.get(k) for r in rs]) for k in GEOMEAN_KEYS}
    return out


def print_geomeans(cell, gm):
    print(f"{cell.upper() + ': geometric means over the shapes':<42}" + "".join(
        f"{k:>21}" for k in GEOMEAN_KEYS))
    for name, g in gm.items():
        print(f"  {name:<40}" + "".join(fmt(g[k], ".2f", 21) for k in GEOMEAN_KEYS))


def print_sweep(rows, Ts, B, n_x, n_a):
    names = list(dict.fromkeys(r["variant"] for r in rows))
    get = {(r["variant"], r["T"]): r for r in rows}
    print(f"\nT sweep, LSTM, B={B}, n_x={n_x}, n_a={n_a}")
    width = max(24, 2 + max(map(len, names)))
    for key, label, spec in (("temp_mib", "XLA temp memory, MiB", ".2f"),
                             ("mem_x_autodiff", "temp memory / autodiff", ".2f"),
                             ("median_ms", "median time, ms", ".2f"),
                             ("x_autodiff", "time / autodiff", ".2f")):
        print(f"{label:<{width}}" + "".join(f"{'T=' + str(T):>11}" for T in Ts))
        for name in names:
            line = "".join(fmt(get.get((name, T), {}).get(key), spec, 11) for T in Ts)
            if line.strip(" -"):
                print(f"  {name:<{width - 2}}" + line)


def plot_sweep(rows, Ts, B, n_x, n_a, path, runs, machine):
    """The memory and time against T PNG; ``machine`` is the JSON's (the title names it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["variant"] for r in rows))  # in one order: stable colours
    names.sort(key=lambda n: (not n.startswith("bptt"), "/" in n, "slots" in n))
    # tab20: its ten dark colours first, then the light ones
    colors = {n: plt.cm.tab20((2 * i) % 20 + (2 * i) // 20) for i, n in enumerate(names)}
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(15, 5.2))
    for name in names:
        rs = sorted((r for r in rows if r["variant"] == name), key=lambda r: r["T"])
        mem = [(r["T"], r["temp_mib"]) for r in rs if r.get("temp_mib")]
        tim = [(r["T"], r["median_ms"]) for r in rs if r.get("median_ms")]
        style = dict(marker="o", color=colors[name], label=name,
                     linestyle="--" if name in ("flax", "equinox", "torch", "torch-aten") else "-")
        if mem:
            ax_m.plot(*zip(*mem), **style)
        if tim:  # per step, so that the variants do not all lie on one line
            ax_t.plot(*zip(*[(T, ms / T) for T, ms in tim]), **style)
    timed = sorted({r["T"] for r in rows if r.get("median_ms")})
    for ax, ylabel, title, ticks in (
            (ax_m, "XLA temp memory (MiB)", "XLA temporary memory (compiled, JAX variants)", Ts),
            (ax_t, "median time / T (ms per step)",
             f"time of forward + backward per step (median of {runs})", timed)):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(T) for T in ticks])
        ax.set_xlabel("sequence length T (steps)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_m.set_yscale("log")
    ax_t.set_ylim(bottom=0)
    handles = {}  # one legend for both panels, beside them (PyTorch has no memory line)
    for ax in (ax_m, ax_t):
        handles.update(zip(*reversed(ax.get_legend_handles_labels())))
    fig.legend(handles.values(), handles.keys(), loc="center left", bbox_to_anchor=(0.86, 0.5),
               fontsize=9)
    env = machine.get("env") or {}
    malloc = " ".join(f"{k}={v}" for k, v in env.items() if k.startswith("MALLOC_"))
    fig.suptitle(f"LSTM gradient (params, xs, a0, c0), B={B}, n_x={n_x}, n_a={n_a}, float32, "
                 f"{machine['backend'].upper()}: {machine['cpu']}, {machine['cores']} cores"
                 + (f"\n{malloc}" if malloc else ""))
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke run: small shapes, 3 runs (2 to 5 minutes on 2 cores)")
    p.add_argument("--cells", default="lstm,gru,rnn", help="comma-separated subset of lstm,gru,rnn")
    p.add_argument("--runs", type=at_least(1), default=None, help="timed runs per variant (7; quick 3)")
    p.add_argument("--warmup", type=at_least(0), default=1, help="warm-up rounds before timing")
    p.add_argument("--sweep-T", type=int_list(1), default=None, help="T values of the sweep (64,256,1024,4096)")
    p.add_argument("--sweep-time-max-T", type=at_least(1), default=None,
                   help="time the sweep up to this T (4096; larger T: memory only)")
    p.add_argument("--no-sweep", action="store_true", help="skip the T sweep")
    p.add_argument("--torch-threads", type=at_least(1), default=None,
                   help="torch.set_num_threads(N) (default: leave PyTorch's default)")
    p.add_argument("--markdown", metavar="JSON", default=None,
                   help="print RESULTS.md's tables from a stored run (no timing)")
    add_out(p)
    p.add_argument("--plot", metavar="JSON", default=None,
                   help="redraw the memory and time against T PNG from a stored run, beside "
                        "it (no timing)")
    p.add_argument("--resummarize", metavar="JSON", default=None,
                   help="recompute the paired ratios and geometric means of a stored run "
                        "from its times, and rewrite it (no timing)")
    args = p.parse_args()
    if args.resummarize:
        resummarize(args.resummarize)
        return
    if args.markdown:
        markdown(args.markdown)
        return
    if args.plot:
        with open(args.plot) as f:
            run = json.load(f)
        sw = run["sweep"]
        # named after the JSON: bench_bptt_epyc.json redraws bench_memory_vs_T_epyc.png
        stem = os.path.splitext(os.path.basename(args.plot))[0]
        suffix = stem.removeprefix("bench_bptt") if stem.startswith("bench_bptt") else f"_{stem}"
        png = os.path.join(os.path.dirname(os.path.abspath(args.plot)),
                           f"bench_memory_vs_T{suffix}.png")
        png = plot_sweep(sw["rows"], sw["T"], sw["B"], sw["n_x"], sw["n_a"], png, run["runs"],
                         run["machine"])
        print(f"wrote {png}")
        return

    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    bad = [c for c in cells if c not in GATES]
    if bad:
        p.error(f"unknown cell(s) {bad}; choose from lstm, gru, rnn")
    runs = args.runs or (3 if args.quick else 7)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    sweep_Ts = (args.sweep_T if args.sweep_T else
                [16, 64, 256, 1024] if args.quick else [64, 256, 1024, 4096])
    sweep_time_max = args.sweep_time_max_T or (256 if args.quick else 4096)
    sB, sx, sa = QUICK_SWEEP_SHAPE if args.quick else SWEEP_SHAPE
    suffix = "_quick" if args.quick else ""

    t_start = time.perf_counter()
    notes = Notes()
    policies = getattr(jaxbptt, "RESIDUAL_POLICIES", None)
    if policies is None:
        notes.add("jaxbptt.RESIDUAL_POLICIES absent: one 'bptt' row without residuals=")
    else:
        policies = tuple(policies)
    avail = available_peers(notes)
    torch_threads = None
    if avail["torch"]:
        import torch

        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        torch_threads = torch.get_num_threads()
    vers = versions(avail)
    mach = machine()
    load0 = os.getloadavg()
    print(f"{mach['cpu']}, {mach['cores']} cores, backend {mach['backend']}; "
          + ", ".join(f"{k} {v}" for k, v in vers.items()))
    print(f"torch threads: {torch_threads}; residual policies: {policies}; runs {runs}, "
          f"warm-up {args.warmup}; load average {load0[0]:.1f}", flush=True)
    if mach["env"]:
        print("environment: " + " ".join(f"{k}={v}" for k, v in mach["env"].items()), flush=True)
    if load0[0] > 0.5 * (os.cpu_count() or 1):
        notes.add(f"machine busy at the start (load average {load0[0]:.1f} on {os.cpu_count()} "
                  "cores): timings are noisy, PyTorch's multi-threaded CPU kernels most of all")

    gemm0 = gemm_peak()
    print(f"GEMM 2048^3 float32 (jit): {gemm0['gflops']:.0f} GFLOP/s "
          f"(median {gemm0['median_ms']:.1f} ms)", flush=True)
    peak = gemm0["gflops"]

    results, gm = {}, {}
    for cell in cells:
        rows = []
        t_cell = time.perf_counter()
        for shape in shapes[cell]:
            print(f"[{cell} {shape}] compiling ...", flush=True)
            variants = build_variants(cell, shape, policies, avail, notes)
            times, faults = time_interleaved(variants, runs, args.warmup)
            rows += summarize(cell, shape, variants, times, faults, peak)
            del variants
        results[cell] = rows
        print_table(cell, rows)
        gm[cell] = geomeans(rows)
        print_geomeans(cell, gm[cell])
        print("\n".join(bounds_markdown(cell, rows, peak)))
        print(f"({cell}: {time.perf_counter() - t_cell:.0f} s)", flush=True)

    sweep_rows = []
    if not args.no_sweep:
        t_sw = time.perf_counter()
        for T in sweep_Ts:
            timed = T <= sweep_time_max
            print(f"[sweep T={T}] compiling{' and timing' if timed else ' (memory only)'} ...",
                  flush=True)
            variants = build_variants("lstm", (T, sB, sx, sa), policies, avail, notes,
                                      with_peers_time=timed, products=False,
                                      checkpoints={
                                          label: kw for label, kw in SWEEP_CHECKPOINTS.items()
                                          if not isinstance(kw["chunk"], tuple)
                                          or T % kw["chunk"][0] == 0})
            times, faults = time_interleaved(variants, runs, args.warmup) if timed else ({}, {})
            sweep_rows += summarize("lstm", (T, sB, sx, sa), variants, times, faults, peak)
            del variants
        print_sweep(sweep_rows, sweep_Ts, sB, sx, sa)
        print(f"(sweep: {time.perf_counter() - t_sw:.0f} s)")

    gemm1 = gemm_peak()
    drift = gemm1["gflops"] / gemm0["gflops"]
    print(f"\nGEMM at the end: {gemm1['gflops']:.0f} GFLOP/s ({drift:.2f}× the start; "
          f"% peak above uses the start's {peak:.0f})")
    png = None
    if sweep_rows:
        png = plot_sweep(sweep_rows, sweep_Ts, sB, sx, sa,
                         os.path.join(args.out, f"bench_memory_vs_T{suffix}.png"), runs, mach)
    if notes.items:
        print("\nnotes:\n" + "\n".join(f"  - {n}" for n in notes.items))
    load1 = os.getloadavg()
    path = write_json(f"bench_bptt{suffix}.json", {
        "quick": args.quick, "runs": runs, "warmup": args.warmup, "cells": cells,
        "residual_policies": list(policies) if policies is not None else None,
        "torch_threads": torch_threads, "versions": vers,
        "gemm_start": gemm0, "gemm_end": gemm1, "gemm_peak_gflops_used": peak,
        "model_flops": "3 * 2*T*B*(n_x+n_a)*G*n_a, G = 4 LSTM, 3 GRU, 1 RNN",
        "loadavg_start": load0, "loadavg_end": load1,
        "results": results, "geomeans": gm,
        "sweep": {"cell": "lstm", "B": sB, "n_x": sx, "n_a": sa, "T": sweep_Ts,
                  "time_max_T": sweep_time_max, "rows": sweep_rows},
        "notes": notes.items, "seconds": time.perf_counter() - t_start}, args.out)
    print(f"\nwrote {path}" + (f", {png}" if png else "")
          + f" in {time.perf_counter() - t_start:.0f} s (load average {load1[0]:.1f})")


if __name__ == "__main__":
    main()
