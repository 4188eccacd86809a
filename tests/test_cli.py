"""The `jaxbptt` command line: `check` compares every cell on every backend."""

import importlib
import subprocess
import sys

import jax

from jaxbptt import check, cli


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
    lstm = importlib.import_module("jaxbptt.lstm")  # (jaxbptt.lstm is the function)

    good = lstm._LSTMCell.step_bwd

    def broken(*args):
        ds_prev, dz = good(*args)
        return ds_prev._replace(c=0 * ds_prev.c), dz

    monkeypatch.setattr(lstm._LSTMCell, "step_bwd", staticmethod(broken))
    jax.clear_caches()
    try:
        assert cli.main(["check", "--cell", "lstm"]) == 1
    finally:
        monkeypatch.undo()
        jax.clear_caches()
    out = capsys.readouterr().out
    assert "FAIL" in out and "FAILED: lstm" in out


def test_help_and_usage_errors():
    ok = subprocess.run([sys.executable, "-m", "jaxbptt.cli", "check", "--help"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "jax.grad" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "jaxbptt.cli", "frobnicate"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice" in bad.stderr
