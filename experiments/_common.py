"""Shared bits of the experiment scripts: where results go and what machine ran them."""

import argparse
import json
import os
import platform
import statistics

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine():
    import jax  # here, so that a script can set up JAX (host devices) after importing this

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "jax": jax.__version__, "backend": jax.default_backend(), "env": timing_env()}


def timing_env():
    """The environment variables set that change timings: glibc's allocator (``MALLOC_*``,
    which decides whether a large buffer is mapped afresh on every call), XLA's and the
    thread counts'."""
    return {k: v for k, v in sorted(os.environ.items())
            if k.startswith("MALLOC_") or k in ("XLA_FLAGS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def add_out(parser, what="JSON and PNG files"):
    """``--out DIR``: where the script writes its ``what``."""
    parser.add_argument("--out", metavar="DIR", default=RESULTS,
                        help=f"where it writes its {what} (default experiments/results, "
                             "whose files RESULTS.md quotes: point a trial run elsewhere)")


def at_least(low):
    """An argparse type: an int >= ``low``, or a usage error naming the value."""
    def parse(text):
        try:
            k = int(text)
        except ValueError:
            k = None
        if k is None or k < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return k
    return parse


def int_list(low):
    """An argparse type: comma-separated ints, each >= ``low``."""
    one = at_least(low)
    return lambda text: [one(t) for t in text.split(",")]


def out_path(out, name):
    """``out/name``, creating ``out``."""
    os.makedirs(out, exist_ok=True)
    return os.path.join(out, name)


def write_json(name, data, out=RESULTS):
    path = out_path(out, name)
    with open(path, "w") as f:
        json.dump({"machine": machine(), **data}, f, indent=1)
    return path


def paired_ratio(times, ref_times):
    """``(median, [q1, q3])`` over the rounds of each round's time divided by the reference's
    time in the same round: ratios taken side by side, which a slow spell of a shared
    machine moves less than the ratio of two medians."""
    q = [t / u for t, u in zip(times, ref_times, strict=True)]
    m = statistics.median(q)
    return m, (statistics.quantiles(q, n=4)[::2] if len(q) > 1 else [m, m])
