"""What XLA's CPU runtime does with a recurrence: the facts behind RESULTS.md's "Where the time goes".

Four measurements, each side by side in this process (the one-core case in a child process
pinned to one CPU with ``os.sched_setaffinity``), float32, median of ``--runs``:

1. cores   a scan of only the step product a<t-1> Wh^T, (B, n_a)·(n_a, 4 n_a), per step,
           with every core and pinned to one: does XLA spread one small matmul over cores?
2. overlap one such scan against two independent ones in the same jitted function, at the
           top level and inside an outer scan (as a chunked driver would run them): does the
           runtime run two loops at once, so that a second core could take the other one?
           And in one body of an outer scan, a chunk's loop beside an independent product
           (the previous chunk's weight gradient), and two independent products.
3. faults  the minor page faults of one call of a jitted function whose temp buffer is
           16, 32 + 1, 64 or 128 MiB, and the cost of one fault on freshly mapped memory: is a
           call's temp buffer reused from call to call, or mapped and zeroed afresh? Then the
           same in child processes with glibc's allocator told to keep what it frees
           (``MALLOC_*`` environment variables, KEEP_FREED below), one setting at a time.
4. slices  a loop body of one elementwise op reading the step's row of a scanned
           (K, B, 4 n_a) array (as the LSTM's backward read its gates): one column slice
           of it, two or three, against three whole (K, B, n_a) arrays. What does it cost
           to keep a step's residuals as one array and slice them in the body?

Run: python experiments/cpu_limits.py [--runs 15]
Writes results/cpu_limits.json. Linux only (sched_setaffinity, getrusage's minor faults).
"""

import argparse
import functools
import json
import mmap
import os
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from _common import add_out, at_least, write_json
from jax import lax

MiB = 2**20
STEPS = 200
TEMPS_MIB = (16, 33, 64, 128)
# glibc's malloc serves a request of 32 MiB or more (the most its dynamic mmap threshold rises
# to) with a fresh mapping and unmaps it on free, so each call's temp buffer is faulted in anew.
# Without mmap (MMAP_MAX 0) and trimming, freed memory stays with the process up to 64 MiB; the
# counts fit an allocation from a worker thread's own arena, whose heaps hold at most 64 MiB and
# which maps a larger request anyway: one arena (ARENA_MAX 1, the main heap) stops that too.
KEEP_FREED = (("MALLOC_MMAP_MAX_=0", "MALLOC_TRIM_THRESHOLD_=17179869184"),
              ("MALLOC_ARENA_MAX=1",),
              ("MALLOC_ARENA_MAX=1", "MALLOC_MMAP_MAX_=0", "MALLOC_TRIM_THRESHOLD_=17179869184"))


def median_s(f, runs):
    jax.block_until_ready(f())
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(f())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def step_product_us(B, n_a, runs):
    """Microseconds per step of a scan of the LSTM's recurrent product alone."""
    a = jnp.full((B, n_a), 0.01, jnp.float32)
    W = jnp.full((4 * n_a, n_a), 1e-3, jnp.float32)
    f = jax.jit(lambda a: lax.scan(lambda a, _: ((a @ W.T)[:, :n_a], None), a, None,
                                   length=STEPS)[0])
    return 1e6 * median_s(lambda: f(a), runs) / STEPS


def overlap_ms(B, n_a, runs):
    """One scan of the product, two independent ones, and two inside an outer scan."""
    W = jnp.full((4 * n_a, n_a), 1e-3, jnp.float32)

    def loop(a, n=STEPS):
        return lax.scan(lambda a, _: (jnp.tanh(a @ W.T)[:, :n_a], None), a, None, length=n)[0]

    def nested(a, b):  # 10 chunks of 20 steps, the two chains side by side in each
        return lax.scan(lambda c, _: ((loop(c[0], 20), loop(c[1], 20)), None), (a, b), None,
                        length=STEPS // 20)[0]

    a = jnp.full((B, n_a), 0.01, jnp.float32)
    fns = {"one scan": jax.jit(loop), "two independent scans": jax.jit(lambda a, b: (loop(a), loop(b))),
           "two inside an outer scan": jax.jit(nested)}
    args = {"one scan": (a,)}
    return {name: 1e3 * median_s(lambda f=f, x=args.get(name, (a, a + 1)): f(*x), runs)
            for name, f in fns.items()}


def beside_ms(B, n_a, runs, K=20):
    """In an outer scan over chunks of K steps (as the driver's backward): a chunk's loop and
    a weight-gradient-sized product (K B, 4 n_a)^T (K B, n_a) alone, the two in one body, and
    two independent products in one body. Does the runtime run independent ops at once?"""
    W = jnp.full((4 * n_a, n_a), 1e-3, jnp.float32)
    n = STEPS // K
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    D = jax.random.normal(k[0], (n, K * B, 4 * n_a), jnp.float32)  # arguments, not constants
    X = jax.random.normal(k[1], (n, K * B, n_a), jnp.float32)
    X2 = jax.random.normal(k[2], (n, K * B, n_a), jnp.float32)
    a0, acc0 = jnp.full((B, n_a), 0.01, jnp.float32), jnp.zeros((4 * n_a, n_a), jnp.float32)

    def loop(a):
        return lax.scan(lambda a, _: (jnp.tanh(a @ W.T)[:, :n_a], None), a, None, length=K)[0]

    def chunks(body):
        return jax.jit(lambda a, acc, acc2, D, X, X2: lax.scan(
            lambda c, u: (body(c, D[u], X[u], X2[u]), None), (a, acc, acc2), jnp.arange(n))[0])

    def grad(d, x):  # a weight gradient of one chunk: sum over its K B rows
        return jnp.einsum("rg,rj->gj", d, x)

    fns = {
        "loop": chunks(lambda c, d, x, x2: (loop(c[0]), c[1], c[2])),
        "product": chunks(lambda c, d, x, x2: (c[0], c[1] + grad(d, x), c[2])),
        "loop beside a product": chunks(lambda c, d, x, x2: (loop(c[0]), c[1] + grad(d, x), c[2])),
        "two products": chunks(lambda c, d, x, x2: (c[0], c[1] + grad(d, x), c[2] + grad(d, x2))),
    }
    return {name: 1e3 * median_s(lambda f=f: f(a0, acc0, acc0, D, X, X2), runs)
            for name, f in fns.items()}


def slices_us(B, n_a, runs, K=10):
    """µs per step of a reverse scan over K steps (in an outer scan over STEPS // K chunks)
    whose body is one elementwise op on the carry and slices of the step's inputs."""
    r = np.random.default_rng(0)
    G = jnp.asarray(r.random((K, B, 4 * n_a)), jnp.float32)
    parts = tuple(G[..., i * n_a:(i + 1) * n_a] + 0 for i in range(4))  # four arrays
    c0 = jnp.ones((B, n_a), jnp.float32)
    col = lambda g, i: g[:, i * n_a:(i + 1) * n_a]  # noqa: E731
    bodies = {
        "one slice of (K, B, 4 n_a)": (lambda c, g: c * col(g, 3) + 1, G),
        "two slices of it": (lambda c, g: c * col(g, 3) * col(g, 0), G),
        "three slices of it": (lambda c, g: c * col(g, 3) * col(g, 0) + col(g, 1), G),
        "three (K, B, n_a) arrays": (lambda c, g: c * g[3] * g[0] + g[1], parts),
    }

    def run(body, xs):
        chunk = lambda c, _: (lax.scan(lambda c, g: (body(c, g), None), c, xs, reverse=True)[0],  # noqa: E731
                              None)
        return lax.scan(chunk, c0, None, length=STEPS // K)[0]

    return {name: 1e6 * median_s(lambda f=jax.jit(functools.partial(run, body)), x=xs: f(x), runs)
            / STEPS for name, (body, xs) in bodies.items()}


def faults_per_call(temp_mib):
    """Minor page faults of one call of a function whose temp buffer is ``temp_mib``."""
    n = int(temp_mib * MiB) // 4 // 2  # two live float32 intermediates of n elements
    x = jnp.ones((n,), jnp.float32)
    f = jax.jit(lambda x: jnp.sum(lax.optimization_barrier(jnp.sin(x) * 2) * jnp.cos(x)))
    temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
    jax.block_until_ready(f(x))
    counts = []
    for _ in range(5):
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        jax.block_until_ready(f(x))
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
    return temp, statistics.median(counts)


def faults_by_size():
    """``(temp bytes, faults)`` per size of TEMPS_MIB, after a first pass over the sizes (the
    first calls of a process fault at any size, before the allocator has settled)."""
    for mib in TEMPS_MIB:
        faults_per_call(mib)
    return [faults_per_call(mib) for mib in TEMPS_MIB]


def fault_cost_us(mib=128, repeats=5):
    """Microseconds per minor fault: first touch of a fresh anonymous mapping, less a rewrite."""
    out = []
    for _ in range(repeats):
        m = mmap.mmap(-1, mib * MiB)
        a = np.frombuffer(m, np.float32)
        r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        a[:] = 1.0
        first = time.perf_counter() - t0
        n = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0
        t0 = time.perf_counter()
        a[:] = 2.0
        again = time.perf_counter() - t0
        del a
        m.close()
        out.append(1e6 * (first - again) / max(n, 1))
    return statistics.median(out), resource.getpagesize()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=at_least(1), default=15, help="timed calls per measurement (default 15)")
    add_out(ap, "JSON file")
    ap.add_argument("--pinned-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--faults-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.faults_child:  # started by the parent with some MALLOC_* settings
        print(json.dumps([n for _, n in faults_by_size()]))
        return
    shapes = [(32, 128), (32, 256), (64, 512)]
    if args.pinned_child:  # pinned to one CPU by the parent before JAX started
        print(json.dumps([step_product_us(B, n_a, args.runs) for B, n_a in shapes]))
        return

    cpus = sorted(os.sched_getaffinity(0))
    child = subprocess.run(
        [sys.executable, __file__, "--pinned-child", "--runs", str(args.runs)],
        capture_output=True, text=True, check=True,
        preexec_fn=lambda: os.sched_setaffinity(0, {cpus[0]}))
    pinned = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"1. the step product, µs per step ({len(cpus)} CPUs against one; {STEPS} steps)")
    print(f"{'B, n_a':<12}{'all CPUs':>10}{'one CPU':>10}{'ratio':>8}{'GFLOP/s':>10}")
    cores = []
    for (B, n_a), one in zip(shapes, pinned):
        us = step_product_us(B, n_a, args.runs)
        gf = 2 * B * n_a * 4 * n_a / us / 1e3
        cores.append({"B": B, "n_a": n_a, "us_all": us, "us_one": one, "gflops_all": gf})
        print(f"{f'{B}, {n_a}':<12}{us:>10.1f}{one:>10.1f}{one / us:>8.2f}{gf:>10.0f}")

    print("\n2. independent loops in one jitted function, ms (B=32, n_a=128)")
    over = overlap_ms(32, 128, args.runs)
    for name, ms in over.items():
        print(f"  {name:<28}{ms:>8.2f}  ({ms / over['one scan']:.2f}× one)")

    print(f"\n   ops of one loop body, ms (outer scan over {STEPS // 20} chunks of 20 steps)")
    side = beside_ms(32, 128, args.runs)
    for name, ms in side.items():
        print(f"  {name:<28}{ms:>8.2f}")
    print(f"  the loop beside the product took {side['loop beside a product'] / (side['loop'] + side['product']):.2f}"
          f"× their sum; two products {side['two products'] / side['product']:.2f}× one")

    print("\n3. page faults of one call, by temp buffer size")
    page = resource.getpagesize()
    kept = {}
    for settings in KEEP_FREED:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        env.update(kv.split("=", 1) for kv in settings)
        child = subprocess.run([sys.executable, __file__, "--faults-child"], env=env,
                               capture_output=True, text=True, check=True)
        kept[" ".join(settings)] = json.loads(child.stdout.strip().splitlines()[-1])
    faults = []
    for i, (temp, n) in enumerate(faults_by_size()):
        faults.append({"temp_mib": temp / MiB, "faults": n, "faulted_mib": n * page / MiB,
                       "faulted_mib_with": {k: v[i] * page / MiB for k, v in kept.items()}})
        print(f"  temp {temp / MiB:6.1f} MiB: {n:>7.0f} faults ({n * page / MiB:.1f} MiB)")
    print("  faulted MiB per call in a process started with")
    for k, v in kept.items():
        print(f"    {k}: " + ", ".join(f"{n * page / MiB:.1f}" for n in v))
    cost, page = fault_cost_us()
    print(f"  one fault on fresh memory: {cost:.2f} µs per {page // 1024} KiB page "
          f"({cost * MiB / page / 1e3:.2f} ms per MiB)")

    print("\n4. one elementwise op reading slices of a step's (B, 4 n_a) row, µs per step")
    sliced = {f"{B}, {n_a}": slices_us(B, n_a, args.runs) for B, n_a in ((32, 128), (64, 512))}
    print(f"  {'B, n_a':<28}" + "".join(f"{k:>10}" for k in sliced))
    for name in sliced["32, 128"]:
        print(f"  {name:<28}" + "".join(f"{v[name]:>10.2f}" for v in sliced.values()))

    path = write_json("cpu_limits.json", {
        "runs": args.runs, "steps": STEPS, "cpus": len(cpus), "step_product": cores,
        "overlap_ms": over, "beside_ms": side, "faults_per_call": faults,
        "fault_cost_us": cost, "page_bytes": page, "slices_us": sliced}, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
