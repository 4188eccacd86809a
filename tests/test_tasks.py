"""The training tasks' data is laid out as their docstrings say (jaxbptt.tasks)."""

import math

import numpy as np
import pytest

from jaxbptt import tasks


@pytest.mark.parametrize("delay", [1, 5, 20])
def test_copy_layout(delay):
    # Ten symbols of 8, delay - 1 blanks, the delimiter, then the symbols recalled in the
    # last ten steps; the targets are blank (0) everywhere else.
    task = tasks.get("copy", delay)
    b = task.batch(0, 3, 16)
    T = delay + 20
    assert task.T == T and b.xs.shape == (T, 16, 10) and b.targets.shape == (T, 16)
    assert np.all(b.xs.sum(-1) == 1)  # one-hot at every step
    inputs = b.xs.argmax(-1)
    symbols = inputs[:10]
    assert np.all((symbols >= 1) & (symbols <= 8))
    assert np.all(inputs[10:10 + delay - 1] == 0)  # the blanks
    assert np.all(inputs[10 + delay - 1] == 9)  # the delimiter, once
    assert np.all(inputs[10 + delay:] == 0) and np.sum(inputs == 9) == 16
    assert np.array_equal(b.targets[-10:], symbols)
    assert np.all(b.targets[:-10] == 0)
    assert np.all(b.weights == 1) and b.lengths is None
    assert task.baseline == pytest.approx(10 * math.log(8) / T)


def test_adding_layout():
    # Two channels, values in [0, 1) and two marks, one in each half; the target is the sum
    # of the two marked values, scored at the last step only.
    task = tasks.get("adding", 30)
    b = task.batch(0, 7, 64)
    values, marks = b.xs[..., 0], b.xs[..., 1]
    assert b.xs.shape == (30, 64, 2) and np.all((values >= 0) & (values < 1))
    assert np.all(marks.sum(0) == 2)
    assert np.all(marks[:15].sum(0) == 1) and np.all(marks[15:].sum(0) == 1)
    np.testing.assert_allclose(b.targets, (values * marks).sum(0), rtol=1e-6)
    assert np.all(b.weights[-1] == 1) and np.all(b.weights[:-1] == 0)


def test_charlm_layout():
    # One name per row: x<1> = 0, x<t> = one-hot of character t-1 (the target before it),
    # targets the name then '\n'; weights 1 up to the length, and nothing after it.
    pytest.importorskip("names")
    task = tasks.get("charlm")
    b = task.batch(0, 2, 32)
    corpus = set(tasks.names_corpus())
    assert b.xs.shape == (task.T, 32, len(tasks.VOCAB))
    for row in range(32):
        n = int(b.lengths[row])
        labels = b.targets[:n, row]
        assert labels[-1] == 0 and np.all(labels[:-1] > 0)  # '\n' ends the name
        assert tasks.decode(labels[:-1]) in corpus
        assert np.all(b.xs[0, row] == 0)
        assert np.array_equal(b.xs[1:n, row].argmax(-1), labels[:-1])
        assert np.all(b.xs[1:n, row].sum(-1) == 1) and np.all(b.xs[n:, row] == 0)
        assert np.all(b.weights[:n, row] == 1) and np.all(b.weights[n:, row] == 0)
        assert np.all(b.targets[n:, row] == 0)


@pytest.mark.parametrize("name,T", [("copy", 5), ("adding", 10), ("charlm", 0)])
def test_batches_depend_on_seed_and_step_only(name, T):
    if name == "charlm":
        pytest.importorskip("names")
    task = tasks.get(name, T)
    a, again = task.batch(3, 5, 8), task.batch(3, 5, 8)
    for x, y in zip(a, again):
        assert x is None and y is None or np.array_equal(x, y)
    assert not np.array_equal(task.batch(3, 6, 8).targets, a.targets)
    assert not np.array_equal(task.batch(4, 5, 8).targets, a.targets)
