"""How close the memory planner's estimate is to XLA's: `jaxbptt.memory.plan_bytes` against
the compiled gradient's ``temp_size_in_bytes``, for every cell and policy at a few shapes.

The estimate is what `residuals=<bytes>` plans with and what `jb.residual_plan` reports; the
README quotes the range of ratios this prints. Compiles only, times nothing (about a minute).

Run: python experiments/memory_estimate.py
Writes results/memory_estimate.json.
"""

import argparse

import jax
import jax.numpy as jnp
from _common import write_json

import jaxbptt as jb
from jaxbptt import _driver, memory

SHAPES = [(100, 32, 64, 128), (97, 32, 64, 128), (50, 64, 128, 512), (1021, 16, 32, 64),
          (1021, 32, 64, 128)]  # T, B, n_x, n_a: K dividing T or not, long and short T


def main():
    rows = []
    print(f"{'cell':<6}{'T, B, n_x, n_a':<22}{'policy':<12}{'K':>5}{'XLA MiB':>10}"
          f"{'estimate MiB':>14}{'XLA / estimate':>16}")
    for cell in ("lstm", "gru", "rnn"):
        for T, B, n_x, n_a in SHAPES:
            params = getattr(jb, f"init_{cell}")(jax.random.PRNGKey(0), n_x, n_a)
            xs = jnp.ones((T, B, n_x), jnp.float32)
            obj, _ = memory._cell(params)
            fp = memory.footprint(obj, params, B, n_x, n_a, jnp.float32)
            for policy in _driver.POLICIES:
                default = _driver.default_chunk(obj, B, n_a, jnp.float32)
                K = _driver.chunk_size(T, _driver.Options(residuals=policy, default_chunk=default))
                estimate = memory.plan_bytes(policy, K, T, fp)

                def loss(p, xs, run=getattr(jb, cell), policy=policy):
                    return jnp.sum(run(p, xs, residuals=policy)[0])

                compiled = jax.jit(jax.grad(loss)).lower(params, xs).compile()
                temp = compiled.memory_analysis().temp_size_in_bytes
                rows.append({"cell": cell, "T": T, "B": B, "n_x": n_x, "n_a": n_a, "policy": policy,
                             "chunk": K, "xla_bytes": temp, "estimate_bytes": estimate,
                             "ratio": temp / estimate})
                print(f"{cell:<6}{f'{T}, {B}, {n_x}, {n_a}':<22}{policy:<12}{K:>5}"
                      f"{temp / 2**20:>10.2f}{estimate / 2**20:>14.2f}{temp / estimate:>16.3f}")
    print()
    for cell in ("lstm", "gru", "rnn"):
        r = [row["ratio"] for row in rows if row["cell"] == cell]
        print(f"{cell}: XLA's temp memory {min(r):.2f}-{max(r):.2f}x the estimate")
    print(f"wrote {write_json('memory_estimate.json', {'rows': rows})}")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help
    main()
