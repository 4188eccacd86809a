"""Test configuration: float64 on, strict rank promotion, backends from jax.devices()."""

import jax
import pytest

from jaxbptt.check import devices

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
