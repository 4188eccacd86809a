"""The ``jaxbptt`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time


def _check(args) -> int:
    import jax

    jax.config.update("jax_enable_x64", True)
    from jaxbptt import check

    start = time.perf_counter()
    results = []
    cells = [(c, v) for c, v in check.CELLS if not args.cell or c in args.cell]
    total = len(cells) * sum(len(check.dtypes_for(d)) for d in check.devices())
    for device in check.devices():
        for dtype in check.dtypes_for(device):
            for cell, variant in cells:
                print(f"[{len(results) + 1}/{total}] {cell} {variant} {dtype} "
                      f"{device.platform}", file=sys.stderr, flush=True)
                results.append(check.check_one(cell, variant, dtype, device, args.seed))
    elapsed = time.perf_counter() - start
    failed = [r for r in results if not r.ok]
    if args.json:
        print(json.dumps([{**r.__dict__, "ok": r.ok} for r in results], indent=2))
    else:
        print(_table(results, args.verbose))
    print(f"{len(results) - len(failed)}/{len(results)} checks passed "
          f"({', '.join(f'{c} {v}' for c, v in cells)}) in {elapsed:.1f} s"
          + (f"; FAILED: {', '.join(f'{r.cell} {r.variant} {r.dtype} {r.backend}' for r in failed)}"
             if failed else ""), file=sys.stderr if args.json else sys.stdout)
    return 1 if failed else 0


def _table(results, verbose) -> str:
    head = ["cell", "variant", "dtype", "backend", "params", "xs", "a0", "c0", "tol", "ok"]
    rows = []
    for r in results:
        params = max(v for k, v in r.errors.items() if "." in k)
        cells = [r.cell, r.variant, r.dtype, r.backend, f"{params:.1e}",
                 f"{r.errors['xs']:.1e}", f"{r.errors['a0']:.1e}",
                 f"{r.errors['c0']:.1e}" if "c0" in r.errors else "-",
                 f"{r.tolerance:.0e}", "ok" if r.ok else "FAIL"]
        rows.append(cells)
        if verbose:
            rows += [["", "", "", "", f"{k}: {v:.2e}", "", "", "", "", ""]
                     for k, v in r.errors.items()]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*row) for row in rows]
    lines.append("(max relative error |g_bptt - g_autodiff|_max / |g_autodiff|_max, "
                 "params = worst parameter)")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    from jaxbptt import check

    parser = argparse.ArgumentParser(
        prog="jaxbptt",
        description="Backpropagation through time with hand-derived gradients, in JAX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    p = sub.add_parser(
        "check", help="compare the hand-derived BPTT with jax.grad on every cell and backend",
        description="For every cell and variant, on every JAX backend present, compare the "
        "hand-derived BPTT gradients with jax.grad of the autodiff path under jit, in float64 "
        "(where supported) and float32. Exits 1 on a mismatch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cell", action="append", choices=sorted({c for c, _ in check.CELLS}),
                   help="check only this cell (repeatable; default: every cell)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the test problems")
    p.add_argument("--verbose", action="store_true", help="also list every gradient's error")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(run=_check)
    return parser


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
