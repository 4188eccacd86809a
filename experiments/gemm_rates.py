"""The default LSTM's matmuls through XLA and through PyTorch's GEMM, shape by shape.

jaxbptt's default LSTM takes about the time of its matmuls with the loops that carry them
(the bench's `products` rows; RESULTS.md, "What XLA's products allow"), so its speed against
PyTorch is decided by how fast XLA's CPU backend runs products of these small shapes. This times each of them (the per-step products and each
chunk's input projection, dWh, dWx and dx, as `jaxbptt.lstm` writes them, at the benchmark's
LSTM shapes) through XLA and through PyTorch's GEMM (MKL on x86), with PyTorch's default
threads and with one, on the same operands. Then it adds them up per forward + backward (the
default's products at XLA's rates, and the same products at PyTorch's), beside the whole
forward + backward of jaxbptt's default LSTM and of PyTorch's nn.LSTM, timed in the same
children as in the bench (`bench_bptt.py`).

Each library runs in a child process of its own, the children alternating for ``--rounds``
rounds (the medians over the rounds are reported): in one process, the idle threads of one
library's pool slowed the other's small products by up to several times, in both
directions. XLA runs STACK products in one jitted ``fori_loop`` (a loop, as the library's
products run), each written over the last (stacking the outputs cost up to 100 µs more per
product); PyTorch runs them in a Python loop writing into preallocated outputs, so its times
include Python's call overhead (a few µs per product) and XLA's include its loop's and the
copy of each product's operand out of the stack.
The 2048³ GEMM of each child gives the machine's large-product rate beside them.

Run: python experiments/gemm_rates.py [--rounds 3] [--runs 15]   (needs PyTorch, the bench
extra). Writes results/gemm_rates.json.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import numpy as np
from _common import add_out, at_least, write_json

LSTM_SHAPES = ((100, 32, 64, 128), (100, 32, 64, 256), (200, 64, 128, 512), (50, 64, 128, 512))
STACK = 20  # distinct operands per timed call, so that nothing is computed once for all
LIBS = ("xla", "torch", "torch, 1 thread")


def lstm_products(T, B, n_x, n_a):
    """The matmuls of the default LSTM's forward + backward, as `jaxbptt.lstm` writes them:
    ``(K, {name: (calls per forward + backward, varying operand's shape, fixed operand's
    shape, (transpose the first?, transpose the second?))})``, K the default's chunk."""
    from jaxbptt import _driver

    K = _driver.chunk_size(T, _driver.Options())
    G, R, n = 4 * n_a, K * B, -(-T // K)
    return K, {
        "step a Wh^T": (T, (B, n_a), (G, n_a), (False, True)),
        "step dz Wh": (T, (B, G), (G, n_a), (False, False)),
        "chunk x Wx^T": (n, (R, n_x), (G, n_x), (False, True)),
        "chunk dz^T a (dWh)": (n, (R, G), (R, n_a), (True, False)),
        "chunk dz^T x (dWx)": (n, (R, G), (R, n_x), (True, False)),
        "chunk dz Wx (dx)": (n, (R, G), (G, n_x), (False, False)),
    }


def _operands(x, y, transposed):
    """The two factors of a product, transposed as views (no copies; numpy, torch, jnp)."""
    return tuple(v.T if t else v for v, t in zip((x, y), transposed))


def _median_s(f, runs):
    f()  # warm-up (and compile)
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _product_timer(lib, X, Y, tr):
    """A function running the products ``X[i] · Y`` (transposed as ``tr``) through ``lib``."""
    if lib == "xla":
        import jax
        import jax.numpy as jnp

        (m, _), (_, n) = (o.shape for o in _operands(X[0], Y, tr))
        f = jax.jit(lambda X, Y: jax.lax.fori_loop(  # each product written over the last
            0, len(X), lambda i, _: jnp.matmul(*_operands(X[i], Y, tr)), jnp.zeros((m, n), X.dtype)))
        jX, jY = jnp.asarray(X), jnp.asarray(Y)
        return lambda: jax.block_until_ready(f(jX, jY))
    import torch

    tX, tY = torch.from_numpy(X), torch.from_numpy(Y)
    Z = torch.empty((len(tX), *torch.matmul(*_operands(tX[0], tY, tr)).shape))

    def loop():
        for i in range(len(tX)):
            torch.mm(*_operands(tX[i], tY, tr), out=Z[i])
    return loop


def lstm_timer(lib, T, B, n_x, n_a):
    """Forward + backward of sum(hs · w) as the bench runs it: jaxbptt's default LSTM
    (``lib`` "xla") or PyTorch's nn.LSTM."""
    import jax
    import jax.numpy as jnp

    import _bench_peers as peers

    k = jax.random.split(jax.random.PRNGKey(0), 5)
    xs = jax.random.normal(k[0], (T, B, n_x), jnp.float32)
    a0, c0 = (0.5 * jax.random.normal(k[i], (B, n_a), jnp.float32) for i in (1, 2))
    w = jax.random.normal(k[3], (T, B, n_a), jnp.float32)
    params = peers.jaxbptt_params("lstm", k[4], n_x, n_a)
    if lib != "xla":
        return peers.torch_setup("lstm", params, xs, a0, c0, w)
    fwd = peers.jaxbptt_fwd("lstm", "bptt")
    grad = jax.jit(jax.grad(lambda p, xs, s0: jnp.sum(fwd(p, xs, s0) * w), argnums=(0, 1, 2)))
    args = (params, xs, peers.jaxbptt_state("lstm", a0, c0))
    return lambda: jax.block_until_ready(grad(*args))


def measure(lib, runs, N=2048):
    """In a child process: the 2048³ GEMM's GFLOP/s, each product's median µs and each
    shape's whole LSTM forward + backward's median ms."""
    if lib == "torch, 1 thread":
        import torch
        torch.set_num_threads(1)
    engine = "torch" if lib.startswith("torch") else lib
    r = np.random.default_rng(0)
    big = r.standard_normal((N, N), np.float32)
    out = {"big_gemm_gflops": 2 * N**3 / _median_s(
        _product_timer(engine, big[None], big, (False, False)), runs) / 1e9, "us": [], "lstm_ms": []}
    for shape in LSTM_SHAPES:
        for calls, x_shape, y_shape, tr in lstm_products(*shape)[1].values():
            X = r.standard_normal((STACK, *x_shape), np.float32)
            Y = r.standard_normal(y_shape, np.float32)
            out["us"].append(1e6 * _median_s(_product_timer(engine, X, Y, tr), runs) / STACK)
        out["lstm_ms"].append(1e3 * _median_s(lstm_timer(engine, *shape), runs))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=at_least(1), default=3,
                    help="child processes per library, alternating (default 3)")
    ap.add_argument("--runs", type=at_least(1), default=15,
                    help="timed calls per product in each child (default 15)")
    add_out(ap, "JSON file")
    ap.add_argument("--child", choices=LIBS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.runs)))
        return

    rounds = {lib: [] for lib in LIBS}
    for i in range(args.rounds):
        for lib in (LIBS if i % 2 == 0 else LIBS[::-1]):
            print(f"round {i + 1}/{args.rounds}: {lib}", flush=True)
            child = subprocess.run([sys.executable, __file__, "--child", lib, "--runs", str(args.runs)],
                                   capture_output=True, text=True, check=True)
            rounds[lib].append(json.loads(child.stdout.strip().splitlines()[-1]))
    big = {lib: [r["big_gemm_gflops"] for r in rs] for lib, rs in rounds.items()}
    print("\n2048³ GEMM, GFLOP/s by round: "
          + "; ".join(f"{lib} " + ", ".join(f"{g:.0f}" for g in gs) for lib, gs in big.items()))

    rows, i = [], 0
    for T, B, n_x, n_a in LSTM_SHAPES:
        K, prods = lstm_products(T, B, n_x, n_a)
        for name, (calls, x_shape, y_shape, tr) in prods.items():
            (m, k), (_, n) = (s[::-1] if t else s for s, t in zip((x_shape, y_shape), tr))
            us = {lib: statistics.median(r["us"][i] for r in rs) for lib, rs in rounds.items()}
            rows.append({"T": T, "B": B, "n_x": n_x, "n_a": n_a, "K": K, "product": name,
                         "calls": calls, "m": m, "k": k, "n": n, "us": us,
                         "gflops": {lib: 2 * m * k * n / u / 1e3 for lib, u in us.items()}})
            i += 1

    print("\nGFLOP/s of each product (medians over the rounds), and XLA's time over PyTorch's")
    print(f"{'T, B, n_x, n_a (K)':<24}{'product':<21}{'m×k×n':>15}{'calls':>6}"
          + "".join(f"{lib:>17}" for lib in LIBS) + f"{'XLA ×torch':>12}")
    totals = {}
    for r in rows:
        shape = f"{r['T']}, {r['B']}, {r['n_x']}, {r['n_a']} ({r['K']})"
        mkn = f"{r['m']}×{r['k']}×{r['n']}"
        print(f"{shape:<24}{r['product']:<21}{mkn:>15}{r['calls']:>6}"
              + "".join(f"{r['gflops'][lib]:>17.0f}" for lib in LIBS)
              + f"{r['us']['xla'] / r['us']['torch']:>12.2f}")
        tot = totals.setdefault(shape, dict.fromkeys(LIBS, 0.0))
        for lib in LIBS:
            tot[lib] += r["calls"] * r["us"][lib] / 1e3
    lstm = {lib: [statistics.median(r["lstm_ms"][j] for r in rs) for j in range(len(LSTM_SHAPES))]
            for lib, rs in rounds.items()}
    print("\nper forward + backward, ms: the default's products at each library's rates, and the"
          "\nwhole LSTM (jaxbptt's default on XLA, PyTorch's nn.LSTM)")
    short = {"xla": "xla", "torch": "torch", "torch, 1 thread": "torch 1t"}
    print(f"{'T, B, n_x, n_a (K)':<24}" + "".join(f"{'products ' + short[lib]:>20}" for lib in LIBS)
          + "".join(f"{'LSTM ' + short[lib]:>16}" for lib in LIBS) + f"{'products torch / LSTM torch':>30}")
    for j, (shape, tot) in enumerate(totals.items()):
        tot["lstm"] = {lib: lstm[lib][j] for lib in LIBS}
        print(f"{shape:<24}" + "".join(f"{tot[lib]:>20.1f}" for lib in LIBS)
              + "".join(f"{lstm[lib][j]:>16.1f}" for lib in LIBS)
              + f"{tot['torch'] / lstm['torch'][j]:>30.2f}")
    path = write_json("gemm_rates.json", {"rounds": args.rounds, "runs": args.runs, "stack": STACK,
                                          "big_gemm_gflops": big, "products": rows,
                                          "totals_ms": totals, "per_round": rounds}, args.out)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
