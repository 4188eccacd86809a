"""Where to keep m states among n chunks: Gruslys et al.'s dynamic programme.

``residuals="checkpoint", slots=m`` keeps at most m chunk-entering states at any
time (the initial state among them) instead of all n = ceil(T/K). To backpropagate
through chunk u the backward needs the state entering it, so it reruns the forward
from the latest state kept before u, keeping some of the states it passes for the
chunks still to come. Gruslys et al. (2016, "Memory-Efficient Backpropagation Through
Time", BPTT-HSM) give the least number of chunk forwards this takes, by a recursion on
the split point y of a segment of t chunks entered from a kept state, with k slots:

    C(t, k) = min_{1 <= y < t}  y + C(t - y, k - 1) + C(y, k),
    C(1, k) = 0,   C(t, 1) = t (t - 1) / 2:

run y chunks forward and keep the state reached, backpropagate the t - y chunks to
its right with the k - 1 slots left, free its slot, then the y chunks to its left
with all k. (A chunk's own rerun belongs to its backward, as for ``"checkpoint"``.)
The minimum is Griewank's binomial ``C(t, k) = r t - binom(k + r, k + 1)``, r the
least with ``binom(k + r, k) >= t`` (Griewank & Walther 2000, "Revolve"), which
`_least` evaluates.

Here the call's own forward passes every chunk once before any backward and can
keep states as it goes, for nothing. It cuts the n chunks into segments, left to
right, given m, m - 1, ..., 1 slots:

    F(n, m) = min_{y_m + ... + y_1 = n}  sum_j C(y_j, j).

C(., j) is convex (its increments r, for binom(j + r - 1, j - 1) chunks each), so
the least sum takes the n smallest increments over all j (`_segments`). `cost` is
F(n, m); `schedule` plays the whole recursion once, in Python, and writes down
where every kept state goes, which the driver's backward (a ``lax.scan`` over the
chunks, each step rerunning the forward from one slot to its chunk) follows.
"""

from __future__ import annotations

import functools
from math import comb
from typing import NamedTuple

import numpy as np


def _least(t, k):
    """C(t, k) for an array t of chunk counts: Griewank's closed form."""
    t = np.asarray(t, np.int64)
    reach = [1]  # binom(k + r, k): the chunks r reruns reach with k slots
    while reach[-1] < t.max(initial=0):
        reach.append(reach[-1] * (k + len(reach)) // len(reach))
    r = np.searchsorted(reach, t)
    return r * t - np.asarray([comb(k + i, k + 1) for i in range(len(reach))])[r]


def _best_split(t, k):
    """The best y of a segment of t > 1 chunks with k > 1 slots."""
    y = np.arange(1, t)
    return int(y[np.argmin(y + _least(t - y, k - 1) + _least(y, k))])


def _segments(n, m):
    """The chunks y_j of the segment the call's forward leaves to j = m, ..., 1 slots
    (left to right), and F(n, m): the n least increments of C(., j) over all j."""
    sizes, left, total, r = dict.fromkeys(range(m, 0, -1), 0), n, 0, 0
    while left:
        for j in sizes:  # at equal increments, the segments with more slots first
            take = min(left, comb(j + r - 1, j - 1))  # C(., j) rises by r this often
            sizes[j], left, total = sizes[j] + take, left - take, total + r * take
        r += 1
    return sizes, total


def cost(n: int, m: int) -> int:
    """Chunk forwards the backward reruns with m slots for n chunks, beyond the one
    each chunk's backward runs: F(n, m) (0 when m >= n)."""
    n, m = _counts("cost", n, m)
    return _segments(n, min(m, n))[1]


def _counts(name, n, m):
    """n >= 1 chunks and m >= 1 slots as ints, or a ValueError."""
    if not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1
               for k in (n, m)):
        raise ValueError(f"{name} needs ints n >= 1 chunks and m >= 1 slots, got n={n!r}, "
                         f"m={m!r}")
    return int(n), int(m)


class Schedule(NamedTuple):
    """Where the kept states live, for n chunks counted in the order the forward runs them.

    ``slot[q]``  the slot the state entering chunk q goes to whenever a forward
                 (the call's, or a rerun) passes it; ``m``, a scratch slot, if it is
                 never kept. Writing it before q is kept is harmless: a forward only
                 passes chunks right of every live state, and the slot q gets is free
                 when q is kept, so no state alive in between can hold it (one that
                 did would lie left of q, hence still be alive when q is kept).
    ``start[u]`` the chunk whose entering state (in ``slot[start[u]]``) the
                 backward of chunk u reruns from: u itself when nothing has run since
                 u's state was kept, else where the rerun under way began.

    The arrays are read-only (schedules are cached).
    """

    slot: np.ndarray
    start: np.ndarray
    forwards: int  # chunk forwards rerun (= cost(n, m))


@functools.lru_cache(maxsize=64)
def schedule(n: int, m: int) -> Schedule:
    """The optimal `Schedule` of n chunks with m >= 1 slots, slot 0 holding the initial
    state (with m >= n, every start in a slot of its own and no reruns)."""
    n, m = _counts("schedule", n, m)
    if m >= n:  # every chunk start kept where the call's forward passes it: no reruns
        return _read_only(np.arange(n), np.arange(n), 0)
    slot, start = np.full(n, m), np.zeros(n, np.int64)
    free, tasks, lo = list(range(m - 1, -1, -1)), [], 0
    for k, y in _segments(n, m)[0].items():  # kept by the call's forward
        if y:
            slot[lo] = free.pop()
            tasks += [("free", lo, 0, 0)] * (lo > 0) + [("C", lo, lo + y, k)]
            lo += y
    begin, forwards = None, 0  # begin: the chunk the rerun under way started from
    while tasks:  # a segment [lo, hi) entered from a kept state, with k slots
        kind, lo, hi, k = tasks.pop()
        if kind == "free":
            free.append(slot[lo])
        elif hi - lo == 1 or k == 1:  # backward of hi-1, ..., lo, each rerun from lo
            for u in range(hi - 1, lo - 1, -1):
                start[u] = lo if begin is None else begin
                forwards += u - start[u]
                begin = None
        else:  # run y chunks forward, keep the state reached, and recurse
            y = _best_split(hi - lo, k)
            begin = lo if begin is None else begin
            slot[lo + y] = free.pop()
            tasks += [("C", lo, lo + y, k), ("free", lo + y, 0, 0), ("C", lo + y, hi, k - 1)]
    return _read_only(slot, start, forwards)


def _read_only(slot, start, forwards):
    slot.setflags(write=False)
    start.setflags(write=False)
    return Schedule(slot, start, int(forwards))
