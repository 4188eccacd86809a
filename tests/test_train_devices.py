"""`jaxbptt train --devices N`: data-parallel training, and resuming on another device count.

Runs the CLI in subprocesses with 4 simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=4).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxbptt import checkpoint

pytest.importorskip("names")


def _train(out, steps, devices):
    flags = os.environ.get("XLA_FLAGS", "")  # conftest.py's, kept
    env = {**os.environ, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=4"}
    cmd = [sys.executable, "-m", "jaxbptt.cli", "train", "charlm", "--out", str(out),
           "--steps", str(steps), "--devices", str(devices), "--batch", "8", "--hidden", "8",
           "--save-every", "10", "--sample-every", "0", "--quiet"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def _final(out):
    path = checkpoint.list_checkpoints(os.path.join(out, "checkpoints"))[-1]
    with np.load(os.path.join(path, "arrays.npz")) as z:
        arrays = [z[k] for k in sorted(z.files)]
    return arrays, json.load(open(os.path.join(out, "history.json")))["loss"]


def test_devices_train_like_one_device_and_resume_elsewhere(tmp_path):
    one = _train(tmp_path / "one", 20, 1)
    four = _train(tmp_path / "four", 20, 4)
    assert one.returncode == 0 and four.returncode == 0, one.stderr + four.stderr
    # Interrupted after 10 steps on 4 devices, resumed on 2 (sharded state restored).
    first = _train(tmp_path / "moved", 10, 4)
    moved = _train(tmp_path / "moved", 20, 2)
    assert first.returncode == 0 and moved.returncode == 0, first.stderr + moved.stderr
    assert "resuming from step 10" in moved.stdout
    ref, ref_loss = _final(tmp_path / "one")
    for run in ("four", "moved"):
        got, loss = _final(tmp_path / run)
        # Same math; only the order of the batch sums differs (float32 round-off).
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        for x, y in zip(got, ref, strict=True):
            assert np.max(np.abs(x - y)) <= 1e-4 * max(np.max(np.abs(y)), 1e-6), run


def test_more_devices_than_present_is_a_one_line_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    r = subprocess.run([sys.executable, "-m", "jaxbptt.cli", "train", "adding", "--steps", "2",
                        "--devices", "64", "--out", str(tmp_path)], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "JAX sees" in r.stderr
