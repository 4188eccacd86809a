"""The `jaxbptt` command line: `check` compares every cell on every backend."""

import dataclasses
import json
import subprocess
import sys

import pytest

from jaxbptt import check, cli, tasks, train
from cells import broken_backward


def test_check_passes_and_names_every_cell(capsys):
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    for cell, variant in check.CELLS:
        assert any(line.split()[:2] == [cell, variant] for line in out.splitlines()), (cell, out)
    for device in check.devices():
        assert device.platform in out
    assert "float64" in out and "float32" in out
    assert "checks passed" in out


def test_check_fails_on_a_wrong_gradient(monkeypatch, capsys):
    # Break the LSTM's hand-derived backward (drop the dc carried through Γf):
    # `check` must notice and exit non-zero.
    with broken_backward(monkeypatch, "lstm", lambda ds, dz: (ds._replace(c=0 * ds.c), dz)):
        assert cli.main(["check", "--cell", "lstm"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "FAILED: lstm" in out


def test_help_and_usage_errors():
    ok = subprocess.run([sys.executable, "-m", "jaxbptt.cli", "check", "--help"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "jax.grad" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "jaxbptt.cli", "frobnicate"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def _exit_code(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr()


def test_every_command_has_help(capsys):
    for command in ("check", "train", "sample", "gradflow"):
        code, out = _exit_code([command, "--help"], capsys)
        assert code == 0 and f"usage: jaxbptt {command}" in out.out
    code, out = _exit_code(["--help"], capsys)
    assert code == 0 and all(c in out.out for c in ("check", "train", "sample", "gradflow"))


def test_train_sample_and_resume(tmp_path, capsys):
    pytest.importorskip("names")
    args = ["train", "charlm", "--steps", "20", "--out", str(tmp_path), "--hidden", "8",
            "--batch", "4", "--save-every", "10", "--sample-every", "10"]
    code, out = _exit_code(args, capsys)
    assert code == 0, out.err
    last = out.out.strip().splitlines()[-1]
    assert last.startswith("trained charlm RNN (bptt) steps 0->20") and "ckpt-000000020" in last
    assert "sampled names:" in out.out and "step 10:" in out.out
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    assert (tmp_path / "history.json").exists()
    code, out = _exit_code(args[:3] + ["30"] + args[4:], capsys)
    assert code == 0 and "resuming from step 20" in out.out and "steps 20->30" in out.out
    (tmp_path / "history.json").unlink()  # lost: the same command writes it again
    code, out = _exit_code(args[:3] + ["30"] + args[4:], capsys)
    assert code == 0 and "wrote its missing or damaged history.json" in out.out, out.out
    assert (tmp_path / "history.json").exists()
    code, out = _exit_code(args[:3] + ["30"] + args[4:], capsys)
    assert code == 0 and "30 steps of this run (asked 30); nothing to do" in out.out, out.out
    code, out = _exit_code(["sample", "--out", str(tmp_path), "--n", "4"], capsys)
    assert code == 0 and len(out.out.strip().splitlines()) == 4
    assert "at step 30" in out.err


def test_every_train_option_reaches_the_run(tmp_path, capsys):
    # Each option set away from its default is the run's setting (history.json records
    # the run's Config); --quiet leaves stderr empty.
    pytest.importorskip("names")
    options = {"cell": "lstm", "hidden": 8, "T": 0, "steps": 6, "batch": 4, "optimizer": "sgd",
               "lr": 0.03, "clip": "norm", "clip_value": 2.5, "backward": "autodiff",
               "seed": 3, "save_every": 4, "sample_every": 5, "devices": 1}
    argv = ["train", "charlm", "--out", str(tmp_path), "--quiet"]
    for k, v in options.items():
        argv += ["--" + k.replace("_", "-"), str(v)]
    code, out = _exit_code(argv, capsys)
    assert code == 0 and out.err == "", out.err
    config = json.loads((tmp_path / "history.json").read_text())["config"]
    assert config == {"task": "charlm", **options}
    defaults = dataclasses.asdict(train.Config())
    changed = {k for k, v in options.items() if v != defaults[k]}
    assert changed == set(options) - {"T", "devices"}  # (those two: see test_train*.py)


def test_sample_max_len(tmp_path, capsys):
    pytest.importorskip("names")
    assert _exit_code(["train", "charlm", "--steps", "5", "--out", str(tmp_path), "--hidden",
                       "8", "--batch", "4", "--sample-every", "0", "--quiet"], capsys)[0] == 0
    code, out = _exit_code(["sample", "--out", str(tmp_path), "--n", "30", "--max-len", "3"],
                           capsys)
    names = out.out.splitlines()
    assert code == 0 and len(names) == 30
    stems = [n.removesuffix("…") for n in names]
    assert all(len(stem) <= 3 and "…" not in stem for stem in stems), names
    assert any(n.endswith("…") and len(n) == 4 for n in names), names


def test_sample_without_the_names_package(tmp_path, capsys, monkeypatch):
    pytest.importorskip("names")
    assert _exit_code(["train", "charlm", "--steps", "2", "--out", str(tmp_path), "--hidden",
                       "4", "--batch", "2", "--sample-every", "0", "--quiet"], capsys)[0] == 0

    def missing():
        raise RuntimeError("the charlm task reads ... pip install 'jaxbptt[experiments]'")
    monkeypatch.setattr(tasks, "names_corpus", missing)
    code, out = _exit_code(["sample", "--out", str(tmp_path)], capsys)
    lines = out.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "pip install 'jaxbptt[experiments]'" in lines[0]


def test_gradflow_writes_plots_and_json(tmp_path, capsys):
    code, out = _exit_code(["gradflow", "--T", "12", "--steps", "6", "--train-T", "8",
                            "--out", str(tmp_path)], capsys)
    assert code == 0, out.err
    data = json.loads((tmp_path / "gradflow.json").read_text())
    assert len(data["at_init"]) == 7 and set(data["training"]) == {"rnn", "lstm", "gru"}
    for name, r in data["at_init"].items():
        assert len(r["a"]) == 12 and abs(r["a"][-1] - 1.0) < 1e-5, name  # ‖∂L_T/∂a<T>‖ = 1
    for png in ("gradflow_init.png", "gradflow_training.png"):
        assert (tmp_path / png).stat().st_size > 10_000
    assert out.out.strip().splitlines()[-1].startswith("gradflow: ")


@pytest.mark.parametrize("argv,message", [
    (["train", "poetry"], "invalid choice: 'poetry'"),
    (["train", "adding", "--steps", "-5"], "expected an integer >= 1, got -5"),
    (["train", "adding", "--steps", "0"], "expected an integer >= 1, got 0"),
    (["train", "adding", "--T", "1"], "--T 1: the adding task needs T >= 2"),
    (["train", "copy", "--T", "-5"], "expected an integer >= 0, got -5"),
    (["train", "adding", "--lr", "inf"], "expected a positive finite number, got inf"),
    (["train", "adding", "--seed", "-1"], "expected an integer >= 0, got -1"),
    (["sample", "--out", "x", "--seed", str(2**64)], "expected an integer <= 2147483647"),
    (["train", "adding", "--sample-every", "-1"], "expected an integer >= 0, got -1"),
    (["gradflow", "--steps", "-3"], "expected an integer >= 0, got -3"),
    (["gradflow", "--T", "1"], "expected an integer >= 2, got 1"),
    (["train", "adding", "--out", "/proc/version/run"], "is not a writable directory"),
    (["sample", "--out", "/nonexistent-run"], "no checkpoint in /nonexistent-run"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    code, out = _exit_code(argv, capsys)
    assert code == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], out.err


def test_checkpoint_from_another_model(tmp_path, capsys):
    pytest.importorskip("names")
    base = ["train", "charlm", "--steps", "5", "--out", str(tmp_path), "--hidden", "8",
            "--batch", "4", "--sample-every", "0", "--quiet"]
    assert _exit_code(base, capsys)[0] == 0
    code, out = _exit_code(base + ["--cell", "gru"], capsys)
    assert code == 2 and "cell='rnn' (asked 'gru')" in out.err
    assert len(out.err.strip().splitlines()) == 1
