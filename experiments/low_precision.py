"""How accurate the hand-derived gradients are in bfloat16 and float16, against autodiff's.

For every cell, three shapes and several seeds: the library's initial parameters, inputs
N(0, 1) and an initial state N(0, 0.5²), rounded to the low dtype; the loss sum(hs · w),
summed in float64. Three gradients (params, xs, initial state) at those same rounded inputs:
``backward="bptt"`` and ``backward="autodiff"`` in the low dtype, and the truth, autodiff in
float64. Only the arithmetic of the backward differs. The error of a gradient is its
relative L2 distance to the truth over all leaves; the table gives, per cell, dtype and
shape, the bptt / autodiff error ratio over the seeds (median, min-max) and the median
errors.

Run: python experiments/low_precision.py [--seeds 8] [--out DIR]
Writes results/low_precision.json.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from _common import add_out, at_least, write_json

import jaxbptt as jb

jax.config.update("jax_enable_x64", True)

CELLS = {"rnn": (jb.init_rnn, jb.rnn, {}), "lstm": (jb.init_lstm, jb.lstm, {}),
         "gru-course": (jb.init_gru, jb.gru, {}),
         "gru-cudnn": (jb.init_gru, jb.gru, {"variant": "cudnn"})}
SHAPES = [(11, 3, 4, 5), (64, 8, 8, 32), (100, 32, 64, 128)]  # T, B, n_x, n_a
DTYPES = ("bfloat16", "float16")


def problem(cell, shape, dtype, seed):
    """(params, xs, state0, w) with params, xs, state0 rounded to ``dtype``."""
    T, B, n_x, n_a = shape
    init, _, kw = CELLS[cell]
    params = init(jax.random.PRNGKey(seed), n_x, n_a, **kw)
    rng = np.random.default_rng(seed)
    xs = rng.normal(size=(T, B, n_x))
    a0 = 0.5 * rng.normal(size=(B, n_a))
    state0 = jb.LSTMState(a0, 0.5 * rng.normal(size=(B, n_a))) if cell == "lstm" else a0
    w = jnp.asarray(rng.normal(size=(T, B, n_a)))
    low = jax.tree.map(lambda x: jnp.asarray(x).astype(dtype), (params, xs, state0))
    return low, w


def gradient(cell):
    fn = CELLS[cell][1]

    def loss(params, xs, state0, w, backward):
        hs = fn(params, xs, state0, backward=backward)[0]
        return jnp.sum(hs.astype(jnp.float64) * w)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=4)


def rel_l2(a, b):
    a = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(a)])
    b = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(b)])
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=at_least(1), default=8, help="seeds per cell, dtype and shape (default 8)")
    add_out(p, "JSON file")
    args = p.parse_args()
    t0, rows = time.perf_counter(), []
    print(f"{'cell':<12}{'dtype':<10}{'T, B, n_x, n_a':<20}{'ratio median':>13}{'min-max':>14}"
          f"{'err bptt':>11}{'err autodiff':>14}")
    for cell in CELLS:
        grad = gradient(cell)
        for dtype in DTYPES:
            for shape in SHAPES:
                errs = []
                for seed in range(args.seeds):
                    low, w = problem(cell, shape, dtype, seed)
                    exact = jax.tree.map(lambda x: x.astype(jnp.float64), low)
                    truth = grad(*exact, w, "autodiff")
                    manual, auto = grad(*low, w, "bptt"), grad(*low, w, "autodiff")
                    errs.append((rel_l2(manual, truth), rel_l2(auto, truth)))
                e = np.asarray(errs)
                ratio = e[:, 0] / e[:, 1]
                row = {"cell": cell, "dtype": dtype, "shape": shape,
                       "ratio_median": float(np.median(ratio)), "ratio_min": float(ratio.min()),
                       "ratio_max": float(ratio.max()), "err_bptt": e[:, 0].tolist(),
                       "err_autodiff": e[:, 1].tolist()}
                rows.append(row)
                print(f"{cell:<12}{dtype:<10}{str(shape):<20}{row['ratio_median']:>13.2f}"
                      f"{row['ratio_min']:>7.2f}-{row['ratio_max']:<6.2f}"
                      f"{np.median(e[:, 0]):>11.2e}{np.median(e[:, 1]):>14.2e}", flush=True)
    ratios = np.asarray([[r["ratio_min"], r["ratio_max"]] for r in rows])
    medians = [r["ratio_median"] for r in rows]
    print(f"\nbptt / autodiff error over every cell, dtype, shape and seed: "
          f"{ratios[:, 0].min():.2f}-{ratios[:, 1].max():.2f} "
          f"(medians {min(medians):.2f}-{max(medians):.2f})")
    path = write_json("low_precision.json", {"seeds": args.seeds, "rows": rows}, args.out)
    print(f"wrote {path} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
