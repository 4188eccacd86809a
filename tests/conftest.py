"""Test configuration: float64 on, strict rank promotion, fast-compiling XLA flags on CPU, a
compilation cache for the run, backends from jax.devices()."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

# The suite runs in several processes (pytest-xdist, `-n auto` in pyproject.toml). On a GPU
# each would otherwise reserve most of its memory at start, and the second would fail.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def _cpu_only():
    """JAX_PLATFORMS names only cpu, or no accelerator plugin (CUDA, ROCm, TPU) is installed."""
    from importlib import metadata, util

    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return set(platforms.split(",")) == {"cpu"}
    return not (util.find_spec("jax_plugins") or util.find_spec("libtpu")
                or list(metadata.entry_points(group="jax_plugins")))


# The suite compiles hundreds of small programs, and compiling is most of its time. Two XLA
# flags make the CPU backend compile faster without changing what the tests check (the CLI and
# training tests, run in subprocesses, inherit them):
# - LLVM at -O0 (6 m 50 s instead of 9 m 18 s on 2 cores, when it came in). The optimized HLO
#   module and its temp memory are the same at every level.
# - XLA's older elemental emitters instead of its fusion emitters for the fused loops: the
#   suite's CPU time fell from 14 m 31 s to 9 m 37 s (8 m 02 s to 5 m 29 s wall, on 2 cores).
#   The fusions are the same but for scalar ops that are left unwrapped; the temp memory of 72
#   of the suite's gradients (every cell, policy, lengths, reverse) was identical to the byte.
# `jaxbptt check` (run by CI before the suite) runs with XLA's defaults. Only on CPU-only runs:
# the flags are global, and XLA's GPU backend does not support -O0. To test with other values,
# set --xla_backend_optimization_level or --xla_cpu_use_fusion_emitters in XLA_FLAGS yourself.
# XLA aborts at start on a flag it does not know, and flags come and go between releases:
# each is tried first in a subprocess (once: the xdist workers and the subprocesses of the
# tests inherit the result) and left out if this jaxlib refuses it.


def _with(flags):
    return " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()


def _accepted(flags):
    env = dict(os.environ, XLA_FLAGS=_with(flags), JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                          capture_output=True).returncode == 0


if _cpu_only():
    _new = [f for f in ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
            if f.split("=")[0] not in os.environ.get("XLA_FLAGS", "")]
    if _new and not _accepted(_new):
        _new = [f for f in _new if _accepted([f])]
    os.environ["XLA_FLAGS"] = _with(_new)

# Many tests compile the same program (an autodiff reference, a training step) under another
# Python function, which jit's own cache cannot see: a persistent compilation cache keyed on the
# program, in a directory made here for this run, shared by the xdist workers and the
# subprocesses, and removed at the end (the suite's CPU time fell by 10 % on 2 cores).
# A JAX_COMPILATION_CACHE_DIR of your own is used as it is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="jaxbptt-tests-xla-")
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_CACHE,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

import jax  # noqa: E402
import pytest  # noqa: E402

from jaxbptt.check import devices  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


DEVICES = devices()  # one per platform: CPU always, GPU/TPU when present


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES, ids=lambda d: d.platform)
def device(request):
    """Every platform JAX sees (CPU always; GPU/TPU when present)."""
    return request.param
