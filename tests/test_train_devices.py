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


def _env(count=None):
    """The environment with conftest.py's XLA_FLAGS, and a host device count or none."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if "xla_force_host_platform_device_count" not in f]
    if count:
        flags.append(f"--xla_force_host_platform_device_count={count}")
    return {**os.environ, "XLA_FLAGS": " ".join(flags)}


def _train(out, steps, devices, task="charlm", *options, env=None):
    cmd = [sys.executable, "-m", "jaxbptt.cli", "train", task, "--out", str(out),
           "--steps", str(steps), "--devices", str(devices), "--quiet",
           *(options or ("--batch", "8", "--hidden", "8", "--save-every", "10",
                         "--sample-every", "0"))]
    return subprocess.run(cmd, env=env or _env(4), capture_output=True, text=True, timeout=600)


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


def test_a_long_run_between_checkpoints_does_not_hang(tmp_path):
    # 300 steps with no checkpoint and no progress bar to wait on: the loop itself must
    # bound the steps in flight (train._IN_FLIGHT). Unbounded, XLA's CPU runtime hung in the
    # all-reduce (and aborted after 40 s) in each of 3 tries of this run under the suite's
    # XLA flags, and of two other sizes on 4 devices; on 2 devices it depended on the sizes
    # and the flags.
    r = _train(tmp_path, 300, 4, "adding", "--cell", "lstm", "--hidden", "32", "--batch", "32",
               "--save-every", "1000")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "steps 0->300" in r.stdout


def _cli(out, devices, batch, env):
    return _train(out, 3, devices, "adding", "--batch", batch, "--hidden", "8", env=env)


def test_devices_on_a_cpu_need_no_flags(tmp_path):
    # Without a device count in XLA_FLAGS, --devices N makes the CPU N host devices: the
    # batch check is reached (2 devices seen), and a run trains.
    r = _cli(tmp_path / "odd", "2", "33", _env())
    assert r.returncode == 2 and "--batch 33 must be divisible by --devices 2" in r.stderr
    r = _cli(tmp_path / "run", "2", "8", _env())
    assert r.returncode == 0 and "steps 0->3" in r.stdout, r.stderr[-2000:]


def test_bad_device_options_are_one_line_errors(tmp_path):
    for devices, batch, message, env in [("4", "32", "--devices 4 but JAX sees 2", _env(2)),
                                         ("2", "33", "divisible", _env(2))]:
        out = tmp_path / devices
        r = _cli(out, devices, batch, env)
        assert r.returncode == 2
        assert len(r.stderr.strip().splitlines()) == 1 and message in r.stderr
        assert not out.exists()  # a usage error leaves no run directory behind
