"""Training: losses fall on every task, bptt and autodiff train alike, and runs resume.

Kill-and-resume runs the real CLI in a subprocess, SIGKILLs it mid-training,
resumes it, and compares the final parameters bit for bit with a run that was
never interrupted.
"""

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import pytest

from jaxbptt import checkpoint, tasks, train

pytest.importorskip("names")
SMALL = dict(hidden=16, batch=8, save_every=20, sample_every=0)


def _train(tmp_path, name, **kw):
    config = train.Config(**{**SMALL, **kw})
    return train.train(config, str(tmp_path / name), log=lambda *_: None, progress=False)


@pytest.mark.parametrize("task,cell,steps,T", [
    ("charlm", "rnn", 60, 0), ("adding", "gru", 150, 10), ("copy", "lstm", 120, 5)])
def test_loss_falls(tmp_path, task, cell, steps, T):
    s = _train(tmp_path, task, task=task, cell=cell, steps=steps, T=T, lr=0.02)
    first = np.mean(json.load(open(tmp_path / task / "history.json"))["loss"][:5])
    assert s["final_loss"] < 0.85 * first, (first, s["final_loss"])
    assert os.path.exists(tmp_path / task / "loss.png") or s["plot"] is None


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_bptt_and_autodiff_train_alike(tmp_path, cell):
    # Same seed, same data: the losses agree to float round-off over the whole run.
    runs = {b: _train(tmp_path, b, task="charlm", cell=cell, steps=30, backward=b)
            for b in ("bptt", "autodiff")}
    loss = {b: np.asarray(json.load(open(tmp_path / b / "history.json"))["loss"]) for b in runs}
    np.testing.assert_allclose(loss["bptt"], loss["autodiff"], rtol=5e-6)  # float32 round-off
    leaves = [jax.tree.leaves(runs[b]["params"]) for b in runs]
    for x, y in zip(*leaves):
        assert np.max(np.abs(x - y)) <= 1e-5 * np.max(np.abs(y))


def _cli(out, steps, *extra):
    return [sys.executable, "-m", "jaxbptt.cli", "train", "charlm", "--out", str(out),
            "--steps", str(steps), "--hidden", "16", "--batch", "8", "--save-every", "10",
            "--sample-every", "0", "--quiet", *extra]


def _final_params(out):
    path = checkpoint.list_checkpoints(os.path.join(out, "checkpoints"))[-1]
    with np.load(os.path.join(path, "arrays.npz")) as z:
        return json.load(open(os.path.join(path, "manifest.json")))["step"], \
            [z[k] for k in sorted(z.files)]


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    steps = 400
    subprocess.run(_cli(tmp_path / "straight", steps), check=True, capture_output=True)
    # Start the same run, SIGKILL it once a checkpoint exists (mid-training).
    proc = subprocess.Popen(_cli(tmp_path / "killed", steps), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(checkpoint.list_checkpoints(str(ckpts))) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at, _ = _final_params(tmp_path / "killed")
    assert 0 < killed_at < steps, "the run was not interrupted mid-training"
    done = subprocess.run(_cli(tmp_path / "killed", steps), check=True, capture_output=True,
                          text=True)
    assert f"resuming from step {killed_at}" in done.stdout + done.stderr
    step_a, a = _final_params(tmp_path / "straight")
    step_b, b = _final_params(tmp_path / "killed")
    assert step_a == step_b == steps
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)  # bit for bit
    hist = [json.load(open(tmp_path / r / "history.json"))["loss"] for r in ("straight", "killed")]
    assert hist[0] == hist[1]


def test_corrupted_checkpoint_falls_back_with_warning(tmp_path):
    config = train.Config(**{**SMALL, "steps": 40, "task": "charlm"})
    train.train(config, str(tmp_path), log=lambda *_: None, progress=False)
    paths = checkpoint.list_checkpoints(str(tmp_path / "checkpoints"))
    assert [os.path.basename(p) for p in paths] == ["ckpt-000000020", "ckpt-000000040"]
    template = train.init(config, tasks.get("charlm"))
    arrays = os.path.join(paths[-1], "arrays.npz")
    data = open(arrays, "rb").read()
    with open(arrays, "wb") as f:  # truncated, as by a crash or a full disk
        f.write(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="skipping unreadable checkpoint .*ckpt-000000040"):
        _, manifest = checkpoint.restore_latest(str(tmp_path / "checkpoints"), template)
    assert manifest["step"] == 20
    with open(arrays, "wb") as f:  # same size, one byte flipped
        f.write(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    with pytest.warns(UserWarning, match="checksum"):
        _, manifest = checkpoint.restore_latest(str(tmp_path / "checkpoints"), template)
    assert manifest["step"] == 20
    os.remove(os.path.join(paths[-1], "manifest.json"))  # a half-written checkpoint
    with pytest.warns(UserWarning):
        assert checkpoint.restore_latest(str(tmp_path / "checkpoints"), template)[1]["step"] == 20


def test_checkpoint_of_another_model_is_refused(tmp_path):
    _train(tmp_path, "run", task="charlm", steps=20)
    with pytest.raises(checkpoint.CheckpointError, match=r"hidden=16 \(asked 24\)"):
        _train(tmp_path, "run", task="charlm", steps=20, hidden=24)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = _train(tmp_path, "run", task="charlm", steps=30)  # same run, more steps: resumes
    assert s["resumed_from"] == 20
