"""Memory against time for checkpointing with m slots (Gruslys et al.), against the model.

LSTM gradient (params, xs; zero initial state) of sum(hs * w), float32, B=32, n_x=64, n_a=128 at one T:
"gates" (the default), "checkpoint" at K = sqrt(T), two nests, and "checkpoint" with
chunks of K steps and m slots for several m. For each: XLA's temp memory of the compiled
gradient, the estimate (`jaxbptt.memory.plan_bytes`), the median time (interleaved runs in
a new random order each round) relative to "checkpoint" at K = sqrt(T), the paired ratio
(the median over the rounds of each round's time over that round's K = sqrt(T) time, with its
quartiles), the chunk forwards rerun per chunk, F(n, m) / n, and the planner's time model for
it. The JSON keeps every run's time as well.

Run: python experiments/slots_tradeoff.py [--T 1024] [--runs 7] [--out DIR]
     python experiments/slots_tradeoff.py --plot results/slots_tradeoff_T1024.json  # redraw
Writes results/slots_tradeoff_T<T>.json and results/slots_tradeoff_T<T>.png.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from _common import add_out, at_least, out_path, paired_ratio, write_json

import jaxbptt as jb
from jaxbptt import _driver, memory
from jaxbptt.lstm import LSTM_CELL

B, N_X, N_A = 32, 64, 128


def variants(T):
    K = _driver.chunk_size(T, _driver.Options(residuals="checkpoint"))  # sqrt(T)
    out = [("gates", dict(residuals="gates")),
           (f"checkpoint K={K}", dict(residuals="checkpoint"))]
    out += [(f"nested {c}", dict(residuals="checkpoint", chunk=c)) for c in ((64, 8), (64, 4, 1))
            if T % 64 == 0]
    for k, ms in ((8, (4, 8, 16, 32, 64)), (2, (6, 18)), (1, (32,))):
        out += [(f"K={k}, m={m}", dict(residuals="checkpoint", chunk=k, slots=m)) for m in ms
                if m < -(-T // k)]
    return out, K


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=at_least(2), default=1024, help="sequence length (default 1024)")
    p.add_argument("--runs", type=at_least(1), default=7, help="timed rounds (default 7)")
    p.add_argument("--plot", metavar="JSON", default=None,
                   help="redraw the PNG of a stored run, beside it (no timing)")
    add_out(p)
    args = p.parse_args()
    if args.plot:
        with open(args.plot) as f:
            run = json.load(f)
        png = args.plot.removesuffix(".json") + ".png"
        print(f"wrote {plot(run['rows'], run['T'], png)}")
        return
    T, t0 = args.T, time.perf_counter()
    params = jb.init_lstm(jax.random.PRNGKey(0), N_X, N_A)
    xs = jax.random.normal(jax.random.PRNGKey(1), (T, B, N_X))
    w = jax.random.normal(jax.random.PRNGKey(2), (T, B, N_A))
    fp = memory.footprint(LSTM_CELL, params, B, N_X, N_A, jnp.float32)
    specs, K0 = variants(T)
    rows, fns = [], []
    for i, (name, kw) in enumerate(specs):
        print(f"[{i + 1}/{len(specs)}] compiling {name} ...", flush=True)
        loss = lambda p, x, kw=kw: jnp.sum(jb.lstm(p, x, **kw)[0] * w)  # noqa: E731
        fn = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, xs).compile()
        jax.block_until_ready(fn(params, xs))  # warm-up
        chunk = kw.get("chunk", K0 if kw["residuals"] == "checkpoint" else 8)
        n = -(-T // chunk) if isinstance(chunk, int) else None
        rows.append({
            "variant": name, **kw,
            "temp_mib": fn.memory_analysis().temp_size_in_bytes / 2**20,
            "estimate_mib": memory.plan_bytes(kw["residuals"], chunk, T, fp,
                                              kw.get("slots")) / 2**20,
            "reruns_per_chunk": jb.slots.cost(n, kw["slots"]) / n if "slots" in kw else None,
            "model": (memory._time(memory.Plan(kw["residuals"], chunk, 0, kw.get("slots")), T)
                      if isinstance(chunk, int) else None),  # nests are not planned
        })
        fns.append(fn)
    times = [[] for _ in fns]
    rng = np.random.default_rng(0)
    for r in range(args.runs):
        print(f"round {r + 1}/{args.runs}", flush=True)
        for i in rng.permutation(len(fns)):
            t = time.perf_counter()
            jax.block_until_ready(fns[i](params, xs))
            times[i].append(time.perf_counter() - t)
    base_i = next(i for i, r in enumerate(rows) if r["variant"].startswith("checkpoint K="))
    base, base_model = np.median(times[base_i]), rows[base_i]["model"]
    print(f"\nLSTM T={T}, B={B}, n_x={N_X}, n_a={N_A}, float32; median of {args.runs}; "
          f"time relative to checkpoint K={K0}")
    print(f"{'variant':<22}{'XLA MiB':>9}{'est MiB':>9}{'ms':>9}{'x ckpt':>8}"
          f"{'paired (quartiles)':>22}{'F/n':>7}{'model':>7}")
    for r, t in zip(rows, times):
        r["times_ms"] = [1e3 * x for x in t]  # every run, in round order
        r["median_ms"] = 1e3 * float(np.median(t))
        r["relative"] = float(np.median(t) / base)
        # Side by side: each round's time over the same round's checkpoint K=K0 time.
        r["paired"], r["paired_quartiles"] = paired_ratio(t, times[base_i])
        r["model_relative"] = r["model"] / base_model if r["model"] else None
        fn_ = f"{r['reruns_per_chunk']:.2f}" if r["reruns_per_chunk"] is not None else "-"
        mo = f"{r['model_relative']:.2f}" if r["model_relative"] else "-"
        pq = "{:.2f} ({:.2f}-{:.2f})".format(r["paired"], *r["paired_quartiles"])
        print(f"{r['variant']:<22}{r['temp_mib']:>9.2f}{r['estimate_mib']:>9.2f}"
              f"{r['median_ms']:>9.1f}{r['relative']:>8.2f}{pq:>22}{fn_:>7}{mo:>7}")
    png = plot(rows, T, out_path(args.out, f"slots_tradeoff_T{T}.png"))
    path = write_json(f"slots_tradeoff_T{T}.json", {"T": T, "B": B, "n_x": N_X, "n_a": N_A,
                                              "runs": args.runs, "rows": rows}, args.out)
    print(f"\nwrote {path}, {png} in {time.perf_counter() - t0:.0f} s")


def plot(rows, T, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7.5, 5))
    groups = {"slots, K=8": "K=8,", "slots, K=2": "K=2,", "slots, K=1": "K=1,",
              "nested": "nested", "one start per chunk": "checkpoint K=",
              "gates (default)": "gates"}
    for label, prefix in groups.items():
        pts = sorted((r["temp_mib"], r["relative"]) for r in rows
                     if r["variant"].startswith(prefix))
        if pts:
            ax.plot(*zip(*pts), marker="o", linestyle="-" if len(pts) > 1 else "", label=label)
    # Labels above right, but K=8's left (clear of the nests to its right; its last one, level
    # with the one before at long T, below right) and K=2's below left (clear of K=1 beside it).
    last8 = max((r["slots"] for r in rows if r.get("chunk") == 8 and "slots" in r), default=None)
    for r in rows:
        if "slots" in r or isinstance(r.get("chunk"), (tuple, list)):
            text = f"m={r['slots']}" if "slots" in r else str(tuple(r["chunk"]))
            offset, ha, va = (5, 3), "left", "bottom"
            if "slots" in r and r["chunk"] == 8:
                offset, ha, va = (((5, -4), "left", "top") if r["slots"] == last8
                                  else ((-6, 0), "right", "center"))
            elif "slots" in r and r["chunk"] == 2:
                offset, ha, va = (-5, -3), "right", "top"
            ax.annotate(text, (r["temp_mib"], r["relative"]), fontsize=8, ha=ha, va=va,
                        textcoords="offset points", xytext=offset,
                        bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.8))
    ax.set_xscale("log")
    ticks = [2.0**i for i in range(-1, 12)]
    lo, hi = min(r["temp_mib"] for r in rows), max(r["temp_mib"] for r in rows)
    ticks = [t for t in ticks if lo / 2 <= t <= hi * 2]
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("XLA temp memory of the gradient (MiB)")
    ax.set_ylabel("time relative to one start per chunk (K = sqrt T)")
    ax.set_title(f"LSTM T={T}, B={B}, n_a={N_A}, float32: memory against time")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()
