"""Training tasks: each a pure data function plus a loss.

All data is real or made by the code; nothing is fetched at run time.

* ``charlm``: the course's character-level language model (its "Dinosaurus
  Island" exercise), on the US-census first names shipped by the ``names``
  package, one name per sequence: x<1> = 0, x<t> = one-hot of character t-1,
  y<t> = character t, the last target the newline.
* ``adding``: the adding problem (Hochreiter & Schmidhuber 1997): two input
  channels, random values and a marker on two of them; the target is the sum of
  the two marked values, read from the last state. Predicting 1 scores 1/6.
* ``copy``: the copy-memory task (Arjovsky et al. 2016), T + 20 steps: ten symbols
  of 8, T - 1 blanks, a delimiter, and the symbols to recall in the last ten steps
  (the delimiter ends a delay of T steps). Guessing after the delimiter scores
  10·log(8)/(T+20) per step.

Batches are NumPy arrays drawn from ``(seed, step)``, so a run is reproducible and
resumable from its step alone.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import numpy as np

TASKS = ("charlm", "adding", "copy")
VOCAB = "\n" + "abcdefghijklmnopqrstuvwxyz"  # the course's: '\n' is index 0


class Batch(NamedTuple):
    xs: np.ndarray  # (T, B, n_in) float32
    targets: np.ndarray  # (T, B) int labels, or (B,) float targets for "regress"
    weights: np.ndarray  # (T, B) float32 per-position loss weights (0 on padding)
    lengths: Optional[np.ndarray]  # (B,) int32, or None when every row is full


class Task(NamedTuple):
    name: str
    n_in: int
    n_out: int
    kind: str  # "classify": softmax cross-entropy per step; "regress": MSE on the last state
    T: int
    baseline: float  # the loss of a model that learned nothing useful
    batch: callable  # (seed, step, batch_size) -> Batch


@functools.lru_cache(maxsize=1)
def names_corpus():
    """The distinct first names (lowercase a-z) of the US census lists in ``names``."""
    try:
        import names
    except ImportError as e:
        raise RuntimeError("the charlm task reads the census first-name lists of the 'names' "
                           "package: pip install 'jaxbptt[experiments]'") from e
    found = set()
    for key in ("first:male", "first:female"):
        with open(names.FILES[key]) as f:
            for line in f:
                name = line.split()[0].lower() if line.strip() else ""
                if name and all(c in VOCAB[1:] for c in name):
                    found.add(name)
    return tuple(sorted(found))


def encode(name: str) -> list:
    return [VOCAB.index(c) for c in name]


def decode(indices) -> str:
    return "".join(VOCAB[i] for i in indices)


def _charlm(seed, step, batch_size):
    corpus = names_corpus()
    T = max(len(n) for n in corpus) + 1
    order = np.random.default_rng(seed).permutation(len(corpus))  # one epoch order per seed
    start = step * batch_size
    pick = [order[(start + i) % len(corpus)] for i in range(batch_size)]
    xs = np.zeros((T, batch_size, len(VOCAB)), np.float32)
    labels = np.zeros((T, batch_size), np.int32)
    lengths = np.zeros((batch_size,), np.int32)
    for b, i in enumerate(pick):
        ids = encode(corpus[i])
        n = len(ids) + 1
        lengths[b] = n
        labels[:n, b] = ids + [0]  # targets: the name, then '\n'
        xs[np.arange(1, n), b, ids] = 1.0  # x<1> = 0, then the previous character
    weights = (np.arange(T)[:, None] < lengths[None]).astype(np.float32)
    return Batch(xs, labels, weights, lengths)


def _adding(T, seed, step, batch_size):
    rng = np.random.default_rng([seed, step])
    values = rng.uniform(size=(T, batch_size)).astype(np.float32)
    marks = np.zeros((T, batch_size), np.float32)
    first = rng.integers(0, T // 2, batch_size)
    second = rng.integers(T // 2, T, batch_size)
    marks[first, np.arange(batch_size)] = 1.0
    marks[second, np.arange(batch_size)] = 1.0
    targets = (values * marks).sum(0).astype(np.float32)
    weights = np.zeros((T, batch_size), np.float32)
    weights[-1] = 1.0
    return Batch(np.stack([values, marks], -1), targets, weights, None)


def _copy(delay, seed, step, batch_size):
    rng = np.random.default_rng([seed, step])
    T = delay + 20
    symbols = rng.integers(1, 9, (10, batch_size))
    seq = np.zeros((T, batch_size), np.int64)
    seq[:10] = symbols
    seq[delay + 9] = 9  # the delimiter: recall from the next step on
    labels = np.zeros((T, batch_size), np.int32)
    labels[-10:] = symbols
    xs = np.eye(10, dtype=np.float32)[seq]
    return Batch(xs, labels, np.ones((T, batch_size), np.float32), None)


def get(name: str, T: int = 0) -> Task:
    """The task called ``name``; ``T`` sets the length of ``adding`` (at least 2) and the
    delay of ``copy`` (at least 1); 0 means the task's default."""
    if T < 0 or (name == "adding" and T == 1):
        raise ValueError(f"T={T}: the adding task needs T >= 2 and the copy task a delay "
                         "T >= 1 (0: the task's default)")
    if name == "charlm" and T:
        raise ValueError(f"T={T}: charlm's sequences are the names themselves, T does not "
                         "apply to it")
    if name == "charlm":
        T_names = max(len(n) for n in names_corpus()) + 1
        vocab = len(VOCAB)
        return Task("charlm", vocab, vocab, "classify", T_names, math.log(vocab), _charlm)
    if name == "adding":
        T = T or 50
        return Task("adding", 2, 1, "regress", T, 1 / 6, functools.partial(_adding, T))
    if name == "copy":
        T = T or 20
        return Task("copy", 10, 10, "classify", T + 20, 10 * math.log(8) / (T + 20),
                    functools.partial(_copy, T))
    raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
