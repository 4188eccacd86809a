"""Shared bits of the experiment scripts: where results go and what machine ran them."""

import json
import os
import platform

import jax

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "jax": jax.__version__, "backend": jax.default_backend()}


def write_json(name, data):
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, name)
    with open(path, "w") as f:
        json.dump({"machine": machine(), **data}, f, indent=1)
    return path
