"""Learning curves with the hand-derived BPTT and with autodiff, on the same seeds.

Both runs see the same data and start from the same parameters; their losses
must agree to float32 round-off over the whole run.
Run: python experiments/learning_curves.py [--steps 1500] [--out DIR]
Writes results/learning_curves.json and results/learning_curves.png.
"""

import argparse
import json
import os
import tempfile
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from _common import add_out, at_least, out_path, write_json  # noqa: E402

from jaxbptt import tasks, train  # noqa: E402

RUNS = [  # task, cell, T, lr
    ("charlm", "rnn", 0, 0.01),
    ("charlm", "lstm", 0, 0.01),
    ("charlm", "gru", 0, 0.01),
    ("adding", "gru", 50, 0.01),
    ("copy", "lstm", 20, 0.01),
]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=at_least(1), default=1500, help="training steps per run (default 1500)")
    p.add_argument("--seed", type=at_least(0), default=0, help="seed of the data and parameters (default 0)")
    add_out(p)
    args = p.parse_args()
    results, t0 = [], time.perf_counter()
    fig, axes = plt.subplots(1, len(RUNS), figsize=(4.2 * len(RUNS), 3.8), dpi=110)
    print(f"{'task':<8}{'cell':<6}{'first':>8}{'last':>8}{'baseline':>10}"
          f"{'max |Δloss|/loss':>18}{'bptt s':>8}{'autodiff s':>11}")
    for ax, (task_name, cell, T, lr) in zip(axes, RUNS):
        curves, seconds = {}, {}
        for backward in ("bptt", "autodiff"):
            config = train.Config(task=task_name, cell=cell, T=T, lr=lr, steps=args.steps,
                                  backward=backward, seed=args.seed, hidden=64, clip="norm",
                                  clip_value=5.0, save_every=args.steps, sample_every=0)
            with tempfile.TemporaryDirectory() as out:
                summary = train.train(config, out, log=lambda *_: None, progress=False)
                with open(os.path.join(out, "history.json")) as f:
                    curves[backward] = np.asarray(json.load(f)["loss"])
            seconds[backward] = summary["seconds"]
        b, a = curves["bptt"], curves["autodiff"]
        diff = float(np.max(np.abs(b - a) / np.abs(a)))
        base = tasks.get(task_name, T).baseline
        print(f"{task_name:<8}{cell:<6}{b[:20].mean():>8.4f}{b[-50:].mean():>8.4f}{base:>10.4f}"
              f"{diff:>18.2e}{seconds['bptt']:>8.1f}{seconds['autodiff']:>11.1f}")
        results.append({"task": task_name, "cell": cell, "T": T, "lr": lr,
                        "loss_bptt": b.tolist(), "loss_autodiff": a.tolist(),
                        "max_rel_diff": diff, "seconds": seconds, "baseline": base})
        ax.plot(b, lw=1.6, label="bptt (hand-derived)")
        ax.plot(a, lw=1.0, ls="--", label="autodiff")
        ax.axhline(base, color="gray", ls=":", lw=1, label="baseline")
        ax.set(title=f"{task_name} ({cell.upper()}{', T=' + str(T) if T else ''})\n"
                     f"max relative difference {diff:.1e}",
               xlabel="training step", ylabel="MSE" if task_name == "adding" else "nats / symbol")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle("Learning curves, hand-derived BPTT and autodiff: same seed, same data")
    fig.tight_layout()
    png = out_path(args.out, "learning_curves.png")
    fig.savefig(png)
    path = write_json("learning_curves.json", {"steps": args.steps, "runs": results,
                                               "seconds": time.perf_counter() - t0}, args.out)
    print(f"wrote {path}, {png} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
