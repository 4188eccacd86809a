"""Training: losses fall on every task, bptt and autodiff train alike, and runs resume.

Kill-and-resume runs the real CLI in a subprocess, SIGKILLs it mid-training,
resumes it, and compares the final parameters bit for bit with a run that was
never interrupted.
"""

import dataclasses
import io
import json
import os
import re
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
    manifest_40 = os.path.join(paths[-1], "manifest.json")
    with open(manifest_40, "w") as f:  # a manifest cut short
        f.write('{"step": 4')
    with pytest.warns(UserWarning, match="ckpt-000000040: manifest.json is not valid JSON"):
        assert checkpoint.restore_latest(str(tmp_path / "checkpoints"), template)[1]["step"] == 20
    with open(manifest_40, "w") as f:  # JSON, but not a manifest
        f.write("40")
    with pytest.warns(UserWarning, match="ckpt-000000040: manifest.json holds a int, not an"):
        assert checkpoint.restore_latest(str(tmp_path / "checkpoints"), template)[1]["step"] == 20
    os.remove(manifest_40)  # a half-written checkpoint
    with pytest.warns(UserWarning):
        assert checkpoint.restore_latest(str(tmp_path / "checkpoints"), template)[1]["step"] == 20
    with open(arrays, "wb") as f:  # a good checkpoint whose manifest lost its history
        f.write(data)
    manifest_20 = json.load(open(os.path.join(paths[0], "manifest.json")))
    for key in ("manifest_sha256", "format"):  # as written before manifests had them
        del manifest_20[key]
    del manifest_20["meta"]["history"]
    json.dump({**manifest_20, "step": 40}, open(os.path.join(paths[-1], "manifest.json"), "w"))
    with pytest.warns(UserWarning, match="ckpt-000000040: .*no 'history'"):
        s = train.train(train.Config(**{**SMALL, "steps": 50, "task": "charlm"}), str(tmp_path),
                        log=lambda *_: None, progress=False)
    assert s["resumed_from"] == 20 and s["checkpoint"].endswith("ckpt-000000050")


@pytest.mark.parametrize("edit", [
    ('"hidden": 16', '"hidden": 18'),  # valid JSON still: not a run of another model
    ('"history": [', '"history": [1.0, '),  # one more loss: a silently wrong history
])
def test_corrupted_manifest_falls_back_with_warning(tmp_path, edit):
    # The manifest is checksummed too: an edit that leaves it valid JSON is caught, and
    # the checkpoint before it is used, as for corrupted arrays.
    config = train.Config(**{**SMALL, "steps": 40, "task": "charlm"})
    train.train(config, str(tmp_path), log=lambda *_: None, progress=False)
    newest = checkpoint.list_checkpoints(str(tmp_path / "checkpoints"))[-1]
    path = os.path.join(newest, "manifest.json")
    text = open(path).read()
    assert text.count(edit[0]) == 1
    open(path, "w").write(text.replace(*edit))
    with pytest.warns(UserWarning, match="ckpt-000000040: manifest.json does not match its own"):
        s = train.train(train.Config(**{**SMALL, "steps": 50, "task": "charlm"}), str(tmp_path),
                        log=lambda *_: None, progress=False)
    assert s["resumed_from"] == 20


def test_a_manifest_that_lost_its_digest_falls_back_with_warning(tmp_path):
    # A manifest with a format but no digest is not one written before digests existed:
    # its history, edited meanwhile, is not trusted.
    config = train.Config(**{**SMALL, "steps": 40, "task": "charlm"})
    train.train(config, str(tmp_path), log=lambda *_: None, progress=False)
    newest = checkpoint.list_checkpoints(str(tmp_path / "checkpoints"))[-1]
    path = os.path.join(newest, "manifest.json")
    manifest = json.load(open(path))
    assert "format" in manifest
    del manifest["manifest_sha256"]
    manifest["meta"]["history"][0] += 1.0
    json.dump(manifest, open(path, "w"))
    with pytest.warns(UserWarning, match="ckpt-000000040: manifest.json does not match its own"):
        s = train.train(train.Config(**{**SMALL, "steps": 50, "task": "charlm"}), str(tmp_path),
                        log=lambda *_: None, progress=False)
    assert s["resumed_from"] == 20


def test_only_the_resumable_settings_may_change_on_resume(tmp_path):
    _train(tmp_path, "run", task="charlm", steps=20)
    # Any other setting is another run, named in the error.
    others = dict(task="adding", cell="lstm", hidden=24, batch=4, optimizer="sgd", lr=0.02,
                  clip="norm", clip_value=2.0, backward="autodiff", seed=1)
    fields = {f.name for f in dataclasses.fields(train.Config)}
    assert set(others) == fields - set(train.RESUMABLE) - {"T"}  # T: its own test above
    for field, value in others.items():
        with pytest.raises(checkpoint.CheckpointError, match=rf"\b{field}=\S+ \(asked "):
            _train(tmp_path, "run", **{"task": "charlm", "steps": 30, field: value})
    # The resumable ones (devices: tests/test_train_devices.py) resume.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = _train(tmp_path, "run", task="charlm", steps=30, save_every=5, sample_every=7)
    assert s["resumed_from"] == 20 and s["checkpoint"].endswith("ckpt-000000030")
    kept = checkpoint.list_checkpoints(str(tmp_path / "run" / "checkpoints"))
    assert checkpoint._step(kept[-2]) == 25


def test_manifest_digest_survives_json(tmp_path):
    # Metadata that JSON changes on the way (int keys become strings, tuples lists, mixed
    # key types) reads back as written, not as a corrupted manifest.
    meta = {"by_int": {2: "x", 10: "y"}, "mixed": {1: "a", "b": 2}, "t": (1, 2.5),
            "nan": float("nan"), "text": "Γf ✓"}
    checkpoint.save(str(tmp_path), 3, {"w": np.arange(3.0)}, meta)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tree, manifest = checkpoint.restore_latest(str(tmp_path), {"w": np.zeros(3)})
    assert manifest["meta"]["by_int"] == {"2": "x", "10": "y"} and manifest["step"] == 3
    np.testing.assert_array_equal(tree["w"], np.arange(3.0))


def test_checkpoint_of_another_shape_names_the_array(tmp_path):
    config = train.Config(**{**SMALL, "steps": 20, "task": "charlm"})
    train.train(config, str(tmp_path), log=lambda *_: None, progress=False)
    other = train.init(train.Config(**{**SMALL, "hidden": 24}), tasks.get("charlm"))
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"holds float32\[16, 27\] where this model has float32\[24, 27\] "
                             r"\(at \[0\]\['cell'\]\.Wax\)"):
        checkpoint.restore_latest(str(tmp_path / "checkpoints"), other)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    _train(tmp_path, "run", task="charlm", steps=20)
    with pytest.raises(checkpoint.CheckpointError, match=r"hidden=16 \(asked 24\)"):
        _train(tmp_path, "run", task="charlm", steps=20, hidden=24)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = _train(tmp_path, "run", task="charlm", steps=30)  # same run, more steps: resumes
    assert s["resumed_from"] == 20


def test_the_default_T_is_the_same_run_as_that_T_written_out(tmp_path):
    _train(tmp_path, "run", task="copy", steps=20)  # T=0: the copy task's delay of 20
    assert _train(tmp_path, "run", task="copy", steps=30, T=20)["resumed_from"] == 20
    with pytest.raises(checkpoint.CheckpointError, match=r"T=20 \(asked 21\)"):
        _train(tmp_path, "run", task="copy", steps=40, T=21)


def _corrupt(path):
    arrays = os.path.join(path, "arrays.npz")
    data = open(arrays, "rb").read()
    with open(arrays, "wb") as f:
        f.write(data[: len(data) // 2])


def test_unreadable_checkpoints_are_kept_not_trained_over(tmp_path):
    # Checkpoints that exist but none of which loads stop the run (it must not start
    # afresh over them), and a save never deletes a newer checkpoint, readable or not,
    # nor anything that is not a checkpoint directory.
    _train(tmp_path, "run", task="charlm", steps=60)
    ckpt_dir = str(tmp_path / "run" / "checkpoints")
    paths = checkpoint.list_checkpoints(ckpt_dir)
    assert [os.path.basename(p) for p in paths] == [
        "ckpt-000000020", "ckpt-000000040", "ckpt-000000060"]
    for p in paths:
        _corrupt(p)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(checkpoint.CheckpointError, match="none of the 3 checkpoints"):
            _train(tmp_path, "run", task="charlm", steps=80)
    assert checkpoint.list_checkpoints(ckpt_dir) == paths
    open(os.path.join(ckpt_dir, "ckpt-000000999"), "w").close()  # stray entries, not ours
    os.mkdir(os.path.join(ckpt_dir, "ckpt-5"))
    template = train.init(train.Config(**{**SMALL, "task": "charlm"}), tasks.get("charlm"))
    checkpoint.save(ckpt_dir, 10, template, {"history": []})
    assert checkpoint.list_checkpoints(ckpt_dir)[1:] == paths  # the newer ones stay
    with pytest.raises(checkpoint.CheckpointError, match="is not a checkpoint directory"):
        checkpoint.save(ckpt_dir, 999, template, {"history": []})
    assert os.path.isfile(os.path.join(ckpt_dir, "ckpt-000000999"))
    assert os.path.isdir(os.path.join(ckpt_dir, "ckpt-5"))


@pytest.mark.parametrize("names", [("history.json",), ("loss.png",), ("history.json", "loss.png")])
def test_a_new_run_does_not_write_over_files_it_did_not_make(tmp_path, names):
    # A fresh run (no checkpoint) in a directory that holds a history.json or loss.png of its
    # own, e.g. the user's: refused before training, the files untouched.
    out = tmp_path / "mine"
    out.mkdir()
    for n in names:
        (out / n).write_text(f"the user's {n}")
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint: a new run would write"):
        _train(tmp_path, "mine", task="adding", steps=5)
    assert set(os.listdir(out)) - {".lock", "checkpoints"} == set(names)
    for n in names:
        assert (out / n).read_text() == f"the user's {n}"
    assert not (out / "checkpoints").exists() or not os.listdir(out / "checkpoints")


def test_divergence_stops_before_a_non_finite_save(tmp_path):
    # A learning rate that blows the parameters up: the run stops with an error and
    # every checkpoint it left holds finite parameters. Saving every step, the step the
    # error names is the one after the last checkpoint, which the error names too.
    with pytest.raises(FloatingPointError, match="training diverged") as e:
        _train(tmp_path, "run", task="adding", cell="rnn", steps=40, T=10, save_every=1,
               optimizer="sgd", lr=1e30, clip="none")
    paths = checkpoint.list_checkpoints(str(tmp_path / "run" / "checkpoints"))
    for p in paths:
        with np.load(os.path.join(p, "arrays.npz")) as z:
            assert all(np.all(np.isfinite(z[k])) for k in z.files), p
    assert 0 < len(paths) < 40
    last = checkpoint._step(paths[-1])
    assert re.match(rf"the loss is (inf|nan) at step {last + 1}:", str(e.value)), (
        last, str(e.value))
    assert f"checkpoints up to step {last} are kept" in str(e.value)


def test_ctrl_c_saves_the_step_and_resumes(tmp_path):
    # One Ctrl-C once training runs (its first progress line): the step finishes, is
    # saved, and the CLI says how to resume, exit status 130, no traceback.
    argv = [a for a in _cli(tmp_path / "run", 100000, "--save-every", "100000") if a != "--quiet"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stderr.readline()
    assert first.startswith("train charlm"), first
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    err = first + err
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Run the same command to resume" in err, err
    step, _ = _final_params(tmp_path / "run")
    assert 0 < step < 100000 and f"interrupted at step {step} " in err
    saved = json.load(open(tmp_path / "run" / "history.json"))
    assert len(saved["loss"]) == step and saved["summary"]["interrupted"]
    # Resumed, it trains on from that step.
    done = subprocess.run(_cli(tmp_path / "run", step + 3), check=True, capture_output=True,
                          text=True)
    assert f"resuming from step {step}" in done.stdout + done.stderr


def test_nothing_to_do_leaves_the_run_as_it_is(tmp_path):
    _train(tmp_path, "run", task="charlm", steps=20)
    before = open(tmp_path / "run" / "history.json").read()
    s = _train(tmp_path, "run", task="charlm", steps=10)  # fewer steps than it holds
    assert s["resumed_from"] == 20 and s["first_loss"] is None
    assert open(tmp_path / "run" / "history.json").read() == before
    os.remove(tmp_path / "run" / "history.json")  # as when killed after the last save
    _train(tmp_path, "run", task="charlm", steps=20)
    assert json.load(open(tmp_path / "run" / "history.json"))["loss"] == json.loads(before)["loss"]


@pytest.mark.parametrize("damage", ["stale", "truncated", "stale plot", "truncated plot"])
def test_files_left_behind_are_mended_by_running_again(tmp_path, damage):
    # Killed after its last checkpoint but before loss.png and history.json were written, a
    # run keeps those of an earlier segment; damaged since, they are not whole. Running the
    # same command again, with nothing left to train, writes both from the checkpoint.
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    _train(tmp_path, "run", task="charlm", steps=20)
    stale = {n: open(run / n, "rb").read() for n in ("history.json", "loss.png")}
    _train(tmp_path, "run", task="charlm", steps=40)
    whole = {n: open(run / n, "rb").read() for n in ("history.json", "loss.png")}
    name = "loss.png" if "plot" in damage else "history.json"
    open(run / name, "wb").write(stale[name] if "stale" in damage else stale[name][:100])
    open(run / f"{name}.tmp", "wb").write(stale[name][:50])  # killed mid-write
    s = _train(tmp_path, "run", task="charlm", steps=30)  # asks fewer steps than it holds
    assert s["resumed_from"] == 40 and s["first_loss"] is None and s["plot"] is not None
    assert s["mended"]
    assert open(run / "loss.png", "rb").read() == whole["loss.png"]
    mended = json.load(open(run / "history.json"))
    assert mended["loss"] == json.loads(whole["history.json"])["loss"]
    assert mended["config"]["steps"] == 40 and mended["summary"]["mended"]
    assert not (run / f"{name}.tmp").exists()
    s = _train(tmp_path, "run", task="charlm", steps=40)  # whole again: left as they are
    assert s["plot"] is None and open(run / "history.json").read() == json.dumps(mended)
    assert "mended" not in s


def test_summary_loss_is_over_this_call_s_steps(tmp_path):
    # The first and the final loss are means over as many steps each, within the steps
    # this call trained: one step resumed gives one loss for both.
    s = _train(tmp_path, "run", task="charlm", steps=50)
    hist = json.load(open(tmp_path / "run" / "history.json"))["loss"]
    assert s["loss_window"] == 20
    assert s["first_loss"] == pytest.approx(np.mean(hist[:20]))
    assert s["final_loss"] == pytest.approx(np.mean(hist[-20:]))
    s = _train(tmp_path, "run", task="charlm", steps=51)
    hist = json.load(open(tmp_path / "run" / "history.json"))["loss"]
    assert s["loss_window"] == 1 and s["first_loss"] == s["final_loss"] == hist[-1]
    s = _train(tmp_path, "run", task="charlm", steps=58)  # 7 steps: two means of 3
    hist = json.load(open(tmp_path / "run" / "history.json"))["loss"]
    assert s["loss_window"] == 3
    assert s["first_loss"] == pytest.approx(np.mean(hist[51:54]))
    assert s["final_loss"] == pytest.approx(np.mean(hist[55:58]))


@pytest.mark.parametrize("every", [0, 7])
def test_sample_every_zero_samples_nothing(tmp_path, every):
    s = _train(tmp_path, "run", task="charlm", steps=7, sample_every=every)
    assert ("samples" in s) == bool(every)


def test_progress_bar_is_cleared_before_other_output():
    # On a terminal the bar is redrawn in place: a line printed meanwhile erases it first.
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    bar = train.Progress(100, 0, "train", stream=stream)
    bar.update(10, "loss 1.0")
    bar.clear()
    drawn = stream.getvalue()
    assert drawn.startswith("\rtrain [") and drawn.endswith("\r\033[K")
    stream.write("step 10: a sample\n")
    bar.redraw()  # drawn again at once, not only at its next update
    assert stream.getvalue() == drawn + "step 10: a sample\n" + drawn[:-len("\r\033[K")]


@pytest.mark.parametrize("flock", [True, False])
def test_save_removes_stale_temporaries_and_keeps_the_umask(tmp_path, monkeypatch, flock):
    # A save killed by SIGKILL leaves its temporary directory behind. A save holds the
    # directory's lock from writing to pruning, so under it any other temporary is a
    # dead save's; without flock, only one untouched for a while is taken as one.
    if not flock:
        monkeypatch.setattr(checkpoint, "fcntl", None)
    ckpt_dir = str(tmp_path)
    stale, fresh = tmp_path / ".tmp-stale", tmp_path / ".tmp-fresh"
    for d in (stale, fresh):
        d.mkdir()
        (d / "arrays.npz").write_bytes(b"partial")
    old = time.time() - 2 * checkpoint._STALE_AFTER
    os.utime(stale, (old, old))
    previous = os.umask(0o022)
    try:
        path = checkpoint.save(ckpt_dir, 1, {"w": np.ones(3)}, {})
    finally:
        os.umask(previous)
    assert not stale.exists() and fresh.exists() != flock
    assert os.stat(path).st_mode & 0o777 == 0o755  # as mkdir under the umask, not 0700
    assert sorted(n for n in os.listdir(ckpt_dir) if n != ".lock") == (
        ["ckpt-000000001"] if flock else [".tmp-fresh", "ckpt-000000001"])


def test_a_filesystem_without_flock_still_saves(tmp_path, monkeypatch):
    import errno

    def no_locks(*_):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(checkpoint.fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="cannot lock .*No locks available"):
        checkpoint.save(str(tmp_path), 1, {"w": np.ones(3)}, {})
    with pytest.warns(UserWarning, match="cannot lock"):
        assert checkpoint.restore_latest(str(tmp_path), {"w": np.zeros(3)})[1]["step"] == 1


def test_one_run_at_a_time_in_an_output_directory(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with checkpoint.locked(str(out), wait=False):  # as a run training there holds it
        with pytest.raises(checkpoint.Busy, match="in use by another process"):
            _train(tmp_path, "run", task="charlm", steps=20)
    assert not (out / "checkpoints").exists()
    assert _train(tmp_path, "run", task="charlm", steps=20)["stopped_at"] == 20


_SAVER = """
import sys
import numpy as np
from jaxbptt import checkpoint
for i in range(40):
    checkpoint.save(sys.argv[1], 10 + i % 3, {"w": np.full(1000, float(sys.argv[2]))}, {})
"""


def test_concurrent_saves_replace_and_prune_safely(tmp_path):
    # Two processes saving the same steps into one directory: every save lands whole
    # (a replace or a prune never meets another half done), and the newest loads.
    procs = [subprocess.Popen([sys.executable, "-c", _SAVER, str(tmp_path), str(k)],
                              stderr=subprocess.PIPE, text=True) for k in (1, 2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    assert [os.path.basename(p) for p in checkpoint.list_checkpoints(str(tmp_path))] == [
        "ckpt-000000010", "ckpt-000000011", "ckpt-000000012"]
    tree, manifest = checkpoint.restore_latest(str(tmp_path), {"w": np.zeros(1000)})
    assert manifest["step"] == 12 and float(tree["w"][0]) in (1.0, 2.0)
    assert sorted(os.listdir(tmp_path)) == [".lock", "ckpt-000000010", "ckpt-000000011",
                                            "ckpt-000000012"]


@pytest.mark.parametrize("task", ["charlm", pytest.param("adding", marks=pytest.mark.slow)])
def test_the_step_is_traced_once_per_run(tmp_path, monkeypatch, task):
    # Every batch has the same shapes and structure (charlm's lengths included), so
    # the jitted step compiles once, not at some later step.
    chex = pytest.importorskip("chex")
    chex.clear_trace_counter()
    monkeypatch.setattr(train, "loss_fn", chex.assert_max_traces(train.loss_fn, n=1))
    assert _train(tmp_path, task, task=task, steps=45, T=8 if task == "adding" else 0)[
        "stopped_at"] == 45


def test_a_name_ended_at_once_is_empty_and_listed_as_such():
    config = train.Config(task="charlm", **SMALL)
    params, _ = train.init(config, tasks.get("charlm"))
    out = params["out"]
    params["out"] = out._replace(by=out.by.at[tasks.VOCAB.index("\n")].set(50.0))
    names = train.sample_names(config, params, jax.random.PRNGKey(0), n=3)
    assert names == ["", "", ""]
    assert train.listed(["ann", *names[:1]]) == "ann, (empty)"


def test_too_many_devices_is_refused_before_out_is_made(tmp_path):
    config = train.Config(**{**SMALL, "devices": len(jax.devices()) + 1})
    with pytest.raises(ValueError, match="JAX sees"):
        train.train(config, str(tmp_path / "run"), log=lambda *_: None, progress=False)
    assert not (tmp_path / "run").exists()


def test_save_keeps_the_newest_earlier_checkpoints(tmp_path):
    # keep=k: a save leaves itself and the newest k - 1 of the earlier steps (keep=0: all
    # of them); checkpoints of later steps are never pruned.
    d = str(tmp_path)
    tree = {"w": np.zeros(2, np.float32)}

    def steps():
        return [int(os.path.basename(p).split("-")[1]) for p in checkpoint.list_checkpoints(d)]

    for s in (1, 2, 3, 4):
        checkpoint.save(d, s, tree, {}, keep=0)
    assert steps() == [1, 2, 3, 4]
    checkpoint.save(d, 5, tree, {}, keep=2)
    assert steps() == [4, 5]
    checkpoint.save(d, 3, tree, {}, keep=1)  # an earlier step: the later ones stay
    assert steps() == [3, 4, 5]


def test_a_manifest_without_a_key_is_skipped_with_a_warning_that_names_it(tmp_path):
    d = str(tmp_path)
    tree = {"w": np.zeros(2, np.float32)}
    checkpoint.save(d, 1, tree, {})
    path = checkpoint.save(d, 2, tree, {})
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    for key in ("manifest_sha256", "format", "meta"):  # as written before the digest, less meta
        del manifest[key]
    json.dump(manifest, open(os.path.join(path, "manifest.json"), "w"))
    with pytest.warns(UserWarning, match=r"ckpt-000000002: manifest.json has no 'meta'$"):
        assert checkpoint.restore_latest(d, tree)[1]["step"] == 1


@pytest.mark.parametrize("obstacle", ["checkpoints file", "history.json dir", "loss.png dir",
                                      "a file named as the last checkpoint"])
def test_what_would_stop_a_save_is_refused_before_training(tmp_path, obstacle):
    # Found before the first step, not at the first save or at the end of the run; the
    # error names the path, and nothing in the directory changes.
    out = tmp_path / "run"
    out.mkdir()
    if obstacle == "checkpoints file":
        (out / "checkpoints").write_text("mine")
        named = out / "checkpoints"
    elif obstacle.endswith(" dir"):
        named = out / obstacle.split()[0]
        named.mkdir()
        (out / "checkpoints").mkdir()  # with a checkpoint: not the "new run over files" case
        _train(tmp_path, "elsewhere", task="adding", steps=5, T=10)
        os.rename(checkpoint.list_checkpoints(str(tmp_path / "elsewhere" / "checkpoints"))[0],
                  out / "checkpoints" / checkpoint.name(5))
    else:
        (out / "checkpoints").mkdir()
        named = out / "checkpoints" / checkpoint.name(40)
        named.write_text("mine")
    def listing():
        return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name != ".lock")

    before = listing()
    traced = []
    real_make_step = train.make_step
    with pytest.MonkeyPatch.context() as m:
        m.setattr(train, "make_step", lambda *a: traced.append(1) or real_make_step(*a))
        with pytest.raises(checkpoint.CheckpointError, match=re.escape(str(named)) + " is "):
            _train(tmp_path, "run", task="adding", steps=40, T=10)
    assert not traced
    assert listing() == before


def test_a_save_that_fails_says_which_checkpoints_are_kept(tmp_path, monkeypatch, capsys):
    # The disk fills at the second save: an OSError naming the step and the checkpoints
    # kept (a one-line error from the command line, status 1); the run resumes from them.
    real_write = checkpoint._write

    def write(tmp, step, leaves, meta):
        if step == 40:
            raise OSError(28, "No space left on device")
        real_write(tmp, step, leaves, meta)

    monkeypatch.setattr(checkpoint, "_write", write)
    with pytest.raises(OSError, match=r"cannot save the checkpoint of step 40 in .*checkpoints "
                                      r"\(No space left on device\); the checkpoints up to "
                                      r"step 20 are kept$"):
        _train(tmp_path, "run", task="adding", steps=60, T=10)
    from jaxbptt import cli

    argv = ["train", "adding", "--T", "10", "--out", str(tmp_path / "run"), "--steps", "60",
            "--hidden", "16", "--batch", "8", "--save-every", "20", "--quiet"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxbptt train: error: cannot save the checkpoint of step 40") and (
        "\n" not in err), err
    monkeypatch.setattr(checkpoint, "_write", real_write)
    assert _train(tmp_path, "run", task="adding", steps=60, T=10)["resumed_from"] == 20


def _after_a_ctrl_c(fn):
    """``fn``, called after this process is sent SIGINT (a Ctrl-C)."""
    def called(*args):
        os.kill(os.getpid(), signal.SIGINT)
        return fn(*args)
    return called


def _cli_stops_before_the_first_step(out, script):
    """Runs ``script`` (which sends a Ctrl-C, then calls the CLI) on a charlm run in ``out``:
    it exits at once, status 130, with one line, no traceback and nothing written."""
    proc = subprocess.run([sys.executable, "-c", script, *_cli(out, 20)[3:]],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().endswith("interrupted before the first step: nothing was saved")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert not checkpoint.list_checkpoints(str(out / "checkpoints"))
    assert set(os.listdir(out)) <= {".lock", "checkpoints"}


_STOP_DURING_INIT = """
import os, signal, sys
from jaxbptt import cli, train
real_init = train.init
def init(*args):  # Ctrl-C while the initial parameters are made (and compiled)
    os.kill(os.getpid(), signal.SIGINT)
    return real_init(*args)
train.init = init
sys.exit(cli.main(sys.argv[1:]))
"""


def test_ctrl_c_before_the_first_step_writes_nothing(tmp_path):
    # From the command line: it exits at once, status 130, with one line and no traceback.
    # From Python: the run returns before its first step, interrupted. Either way nothing
    # is written, and the run starts afresh next time.
    _cli_stops_before_the_first_step(tmp_path / "cli", _STOP_DURING_INIT)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(train, "init", _after_a_ctrl_c(train.init))
        m.setattr(train, "sample_names", lambda *a, **k: pytest.fail("sampled after a stop"))
        s = _train(tmp_path, "py", task="charlm", steps=20, sample_every=10)
    assert s["interrupted"] and s["stopped_at"] == 0 and s["checkpoint"] is None
    assert set(os.listdir(tmp_path / "py")) <= {".lock", "checkpoints"}
    assert _train(tmp_path, "py", task="charlm", steps=20)["resumed_from"] == 0


_STOP_AFTER_STEP_COMPILE = """
import os, signal, sys
import jax
from jaxbptt import cli

def sigint_once_step_compiled(event, duration, fun_name=None, **kw):
    if event == "/jax/core/compile/backend_compile_duration" and fun_name == "jit(step)":
        os.kill(os.getpid(), signal.SIGINT)

jax.monitoring.register_event_duration_secs_listener(sigint_once_step_compiled)
sys.exit(cli.main(sys.argv[1:]))
"""


def test_ctrl_c_while_the_step_compiles_writes_nothing(tmp_path):
    # The training step's compile, the longest wait before the first step, belongs to
    # the start: a Ctrl-C as it ends (sent by JAX's compile-event listener) stops the run
    # with nothing saved, rather than running and saving step 1 (as it did when the step
    # compiled at its first call, inside the loop).
    _cli_stops_before_the_first_step(tmp_path / "cli", _STOP_AFTER_STEP_COMPILE)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes to a read-only directory")
def test_a_checkpoints_directory_it_cannot_write_to_is_refused_before_training(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    os.chmod(tmp_path / "run" / "checkpoints", 0o555)
    try:
        with pytest.raises(checkpoint.CheckpointError, match="checkpoints is not writable"):
            _train(tmp_path, "run", task="adding", steps=5, T=10)
    finally:
        os.chmod(tmp_path / "run" / "checkpoints", 0o755)


def test_a_checkpoint_name_past_the_last_step_is_not_in_the_way(tmp_path):
    # A file named as step 999's checkpoint does not stop a run that ends at step 40.
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / checkpoint.name(999)).write_text("mine")
    assert _train(tmp_path, "run", task="adding", steps=40, T=10)["stopped_at"] == 40
    assert (tmp_path / "run" / "checkpoints" / checkpoint.name(999)).read_text() == "mine"


def test_ctrl_c_while_the_files_are_written_still_writes_them(tmp_path):
    # One Ctrl-C once the steps are done ("finishing"): history.json and loss.png are
    # written all the same, also by a call that only mends them.
    with pytest.MonkeyPatch.context() as m:
        m.setattr(train, "plot_history", _after_a_ctrl_c(train.plot_history))
        s = _train(tmp_path, "run", task="adding", steps=20, T=10)
        assert not s["interrupted"] and (tmp_path / "run" / "history.json").exists()
        os.remove(tmp_path / "run" / "history.json")
        s = _train(tmp_path, "run", task="adding", steps=20, T=10)
    assert s["mended"]
    assert len(json.load(open(tmp_path / "run" / "history.json"))["loss"]) == 20


_STOP_DURING_WRITE = """
import os, signal, sys
from jaxbptt import checkpoint, cli

def write(f):  # Ctrl-C halfway through writing a file
    f.write("half")
    f.flush()
    os.kill(os.getpid(), signal.SIGINT)
    f.write(" and the rest")

with cli._ctrl_c_exits():
    checkpoint.write_atomically(sys.argv[1], write)
"""


def test_ctrl_c_at_once_leaves_no_partial_file(tmp_path):
    # The command line exits at once on Ctrl-C (outside a training loop): a file being
    # written is neither left half written nor as a stray temporary.
    target = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, "-c", _STOP_DURING_WRITE, str(target)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130 and proc.stderr.strip() == "jaxbptt: interrupted", proc.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes to a read-only directory")
def test_a_finished_run_in_a_read_only_directory_has_nothing_to_do(tmp_path):
    _train(tmp_path, "run", task="adding", steps=20, T=10)
    modes = {p: p.stat().st_mode for p in (tmp_path / "run", tmp_path / "run" / "checkpoints")}
    for p in modes:
        os.chmod(p, 0o555)
    try:
        assert _train(tmp_path, "run", task="adding", steps=20, T=10)["resumed_from"] == 20
    finally:
        for p, mode in modes.items():
            os.chmod(p, mode)
