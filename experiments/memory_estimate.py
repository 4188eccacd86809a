"""How close the memory planner's estimate is to XLA's: `jaxbptt.memory.plan_bytes` against
the compiled gradient's ``temp_size_in_bytes``, for every cell and policy at a few shapes,
and for ``"checkpoint"`` with one-step chunks and one to four slots (the least plans).

The estimate is what `residuals=<bytes>` plans with and what `jb.residual_plan` reports; the
README quotes the range of ratios this prints. Compiles only, times nothing (about two minutes).

Run: python experiments/memory_estimate.py [--out DIR]
Writes results/memory_estimate.json.
"""

import argparse

import jax
import jax.numpy as jnp
from _common import add_out, write_json

import jaxbptt as jb
from jaxbptt import _driver, memory

SHAPES = [(100, 32, 64, 128), (97, 32, 64, 128), (50, 64, 128, 512), (1021, 16, 32, 64),
          (1021, 32, 64, 128)]  # T, B, n_x, n_a: K dividing T or not, long and short T
SLOT_SHAPES = [(100, 32, 64, 128), (1021, 32, 64, 128)]
SLOTS = (1, 2, 3, 4)  # with one-step chunks


def _row(cell, shape, policy, chunk=None, slots=None):
    """XLA's temp memory for the gradient of one call against the planner's estimate
    (``chunk=None``: the policy's default chunk, as the call chooses it)."""
    T, B, n_x, n_a = shape
    params = getattr(jb, f"init_{cell}")(jax.random.PRNGKey(0), n_x, n_a)
    xs = jnp.ones((T, B, n_x), jnp.float32)
    obj, _ = memory.cell_of(params)
    fp = memory.footprint(obj, params, B, n_x, n_a, jnp.float32)
    default = _driver.default_chunk(obj, B, n_a, jnp.float32)
    K = _driver.chunk_size(T, _driver.Options(residuals=policy, chunk=chunk,
                                              default_chunk=default))
    estimate = memory.plan_bytes(policy, K, T, fp, slots=slots)

    def loss(p, xs):
        return jnp.sum(getattr(jb, cell)(p, xs, residuals=policy, chunk=chunk, slots=slots)[0])

    temp = jax.jit(jax.grad(loss)).lower(params, xs).compile().memory_analysis().temp_size_in_bytes
    row = {"cell": cell, "T": T, "B": B, "n_x": n_x, "n_a": n_a, "policy": policy, "chunk": K,
           "slots": slots, "xla_bytes": temp, "estimate_bytes": estimate, "ratio": temp / estimate}
    print(f"{cell:<6}{f'{T}, {B}, {n_x}, {n_a}':<22}{policy:<12}{K:>5}{slots or '-':>7}"
          f"{temp / 2**20:>10.2f}{estimate / 2**20:>14.2f}{temp / estimate:>16.3f}")
    return row


def main(args):
    rows = []
    print(f"{'cell':<6}{'T, B, n_x, n_a':<22}{'policy':<12}{'K':>5}{'slots':>7}{'XLA MiB':>10}"
          f"{'estimate MiB':>14}{'XLA / estimate':>16}")
    for cell in ("lstm", "gru", "rnn"):
        for shape in SHAPES:
            rows.extend(_row(cell, shape, policy) for policy in _driver.POLICIES)
        for shape in SLOT_SHAPES:
            rows.extend(_row(cell, shape, "checkpoint", 1, m) for m in SLOTS)
    kinds = {**{p: p for p in _driver.POLICIES}, "slots": "K=1, 1-4 slots",
             "policies": "policies"}  # the last: the three policies at their default chunks
    print("\nXLA's temp memory / the estimate, min-max over the shapes (slots: checkpoint)")
    print(f"{'cell':<6}" + "".join(f"{k:>16}" for k in kinds.values()))
    for cell in ("lstm", "gru", "rnn"):
        line = f"{cell:<6}"
        for kind in kinds:
            r = [row["ratio"] for row in rows if row["cell"] == cell and kind in (
                ("slots",) if row["slots"] is not None else ("policies", row["policy"]))]
            line += f"{f'{min(r):.2f}-{max(r):.2f}':>16}"
        print(line)
    print(f"wrote {write_json('memory_estimate.json', {'rows': rows}, args.out)}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_out(p, "JSON file")
    args = p.parse_args()
    main(args)
