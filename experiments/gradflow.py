"""Gradient flow through time: ‖∂L_T/∂a<t>‖ against the lag, at init and during training.

Run: python experiments/gradflow.py [--T 100] [--steps 600] [--out DIR]
Writes results/gradflow.json, results/gradflow_init.png, results/gradflow_training.png.
"""

import argparse
import time

from _common import add_out, at_least, out_path, write_json

from jaxbptt import gradflow
from jaxbptt.train import Progress


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=at_least(2), default=100, help="steps of the at-init sequences (default 100)")
    p.add_argument("--steps", type=at_least(1), default=600,
                   help="training steps of the adding task (default 600)")
    p.add_argument("--train-T", type=at_least(2), default=50,
                   help="sequence length of the adding task (default 50)")
    add_out(p)
    args = p.parse_args()
    t0 = time.perf_counter()
    init = gradflow.at_init(T=args.T)
    lags = sorted({lag for lag in (0, 10, 25, 50) if lag < args.T} | {args.T - 1})
    print(f"{'mean ||dL_T/da<t>|| at init':<32}" + "".join(f"{'lag ' + str(l):>11}" for l in lags))
    for name, r in init.items():
        a = r["a"][::-1]
        print(f"{name:<32}" + "".join(f"{a[l]:>11.2e}" for l in lags), flush=True)
    maps = {}
    for c in ("rnn", "lstm", "gru"):
        bar = Progress(args.steps, 0, f"train {c} on adding (T={args.train_T})")
        maps[c] = gradflow.during_training(c, T=args.train_T, steps=args.steps,
                                           every=max(1, args.steps // 20),
                                           on_step=lambda n, loss: bar.update(n, f"loss {loss:.4f}"))
    print(f"\nadding task, T={args.train_T}: loss (MSE, baseline 0.167) and "
          f"||dL/da<t>|| at lag {args.train_T - 1}, first -> last recorded step")
    for cell, (steps, norms, loss) in maps.items():
        print(f"{cell:<6} loss {loss[:10].mean():.4f} -> {loss[-20:].mean():.4f}   "
              f"far gradient {norms[0, 0]:.2e} -> {norms[-1, 0]:.2e}")
    png_init = gradflow.plot_at_init(init, out_path(args.out, "gradflow_init.png"), args.T)
    png_train = gradflow.plot_training(maps, out_path(args.out, "gradflow_training.png"),
                                       args.train_T)
    path = write_json("gradflow.json", {
        "T": args.T, "train_T": args.train_T, "steps": args.steps,
        "at_init": {k: {kk: vv.tolist() for kk, vv in v.items()} for k, v in init.items()},
        "training": {c: {"steps": s.tolist(), "norms": n.tolist(), "loss": l.tolist()}
                     for c, (s, n, l) in maps.items()},
        "seconds": time.perf_counter() - t0}, args.out)
    print(f"\nwrote {path}, {png_init}, {png_train} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
