"""Atomic, pickle-free checkpoints: one ``.npz`` of arrays plus a JSON manifest.

(Training checkpoints on disk. The ``residuals="checkpoint"`` policy, which reruns
the forward chunk by chunk in the backward, is in `jaxbptt._driver`.)

A checkpoint is a directory ``ckpt-<step>``, written under a temporary name and
renamed into place (atomic on POSIX), after ``fsync``: a crash mid-save leaves a
stray temporary directory (removed by the next save), never a checkpoint that loads
wrong. Saves hold an exclusive lock of the directory, restores a shared one. The manifest
records the SHA-256 of the arrays file, the array shapes and dtypes, and the
caller's metadata (step, config, RNG key, data position, loss history...), and a
SHA-256 of all that, so that a corrupted manifest is caught too.
Restoring needs a template pytree (a freshly initialised state of the same
model): arrays are checked against it, so a checkpoint of another model is
refused with a clear error instead of being loaded wrong. A corrupted or
truncated checkpoint is skipped with a warning, and the previous one is used; when
none loads, restoring raises rather than letting a run start afresh. Saving prunes
only checkpoints older than the one it writes: never that one, never a newer one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import sys
import time
import warnings

import jax
import numpy as np

try:
    import fcntl
except ImportError:  # not POSIX
    fcntl = None

PREFIX = "ckpt-"
_TMP = ".tmp-"
_STALE_AFTER = 600.0  # seconds: without flock, a temporary untouched this long is a dead save's


class CheckpointError(ValueError):
    """A checkpoint exists but cannot be restored into the requested model."""


class NoReadableCheckpoint(CheckpointError):
    """There are checkpoints, and none of them can be read."""


class Busy(CheckpointError):
    """Another process holds the directory (see `locked`)."""


def sha256(path):
    """The SHA-256 of a file, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_WRITING = set()  # the temporaries of the writes under way, for `exit_at_once`


def write_atomically(path, write, mode="w"):
    """Writes ``path`` whole or not at all: ``write(file)`` to ``path.tmp``, renamed over
    it (a temporary left by a killed process is written over by the next)."""
    tmp = f"{path}.tmp"
    _WRITING.add(tmp)
    try:
        with open(tmp, mode) as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
        _WRITING.discard(tmp)


def exit_at_once(message, status=130):
    """Ends the process now, from a signal handler (``os._exit``: raising inside a JAX
    compile can crash the runtime), after flushing stdout and stderr, deleting the
    temporaries of `write_atomically` calls under way (no ``finally`` runs; a save's
    temporary directory is removed by the next save) and writing ``message`` to stderr."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, RuntimeError, ValueError):  # a closed pipe, a reentrant flush
            pass
    for tmp in list(_WRITING):
        try:
            os.remove(tmp)
        except OSError:
            pass
    try:
        os.write(2, message.encode())
    except OSError:
        pass
    os._exit(status)


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(directory, step: int, tree, meta: dict, keep: int = 3) -> str:
    """Writes ``tree`` (a pytree of arrays) and ``meta`` (JSON-able) as ``ckpt-<step>``.

    Then deletes the checkpoints of earlier steps but the newest ``keep - 1`` of them
    (``keep=0``: none); those of later steps are left alone. Returns the path.
    """
    os.makedirs(directory, exist_ok=True)
    leaves = [np.asarray(x) for x in jax.tree.leaves(tree)]
    final = os.path.join(directory, name(step))
    with locked(directory) as held:  # one save at a time, from writing to pruning
        tmp = os.path.join(directory, f"{_TMP}{os.getpid()}-{secrets.token_hex(4)}")
        # (with the lock held, any other temporary is a killed save's; without flock,
        # one untouched for a while)
        _remove_stale_temporaries(directory, None if held else time.time() - _STALE_AFTER)
        os.mkdir(tmp)  # unlike mkdtemp's 0700, the mode the user's umask gives
        try:
            _write(tmp, step, leaves, meta)
            if os.path.lexists(final) and not os.path.isdir(final):
                raise CheckpointError(f"{final} is in the way of this run's checkpoint and is "
                                      "not a checkpoint directory: move it away")
            if os.path.isdir(final):  # the same step, saved before (or unreadable): replaced
                os.rename(final, tmp + "-replaced")  # (then it is gone in one rename)
            os.rename(tmp, final)
            _fsync_dir(directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(tmp + "-replaced", ignore_errors=True)
        earlier = [p for p in list_checkpoints(directory) if _step(p) < step]
        for old in earlier[:len(earlier) - (keep - 1)] if keep else []:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write(tmp, step, leaves, meta):
    """The arrays and the manifest, flushed to disk, in the directory ``tmp``."""
    arrays = os.path.join(tmp, "arrays.npz")
    with open(arrays, "wb") as f:
        np.savez(f, **{f"leaf_{i:05d}": x for i, x in enumerate(leaves)})
        f.flush()
        os.fsync(f.fileno())
    manifest = {
        "format": 2,  # 2: with manifest_sha256
        "step": int(step),
        "sha256": sha256(arrays),
        "leaves": [[list(x.shape), str(x.dtype)] for x in leaves],
        "meta": meta,
    }
    manifest["manifest_sha256"] = _digest(manifest)
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)


def _digest(manifest):
    """SHA-256 of a manifest's own contents (all but this digest), as canonical JSON.

    Taken of the contents as read back from JSON (keys become strings, tuples lists), so
    that the digest written and the one recomputed on reading agree.
    """
    body = json.loads(json.dumps({k: v for k, v in manifest.items() if k != "manifest_sha256"}))
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def locked(directory, shared=False, wait=True):
    """Holds ``directory/.lock`` (POSIX ``flock``); yields whether it does.

    A save holds it exclusively, a restore shared while it reads, so that neither
    sees the other half done; a training run holds its output directory's without
    ``wait``, so that a second run there is refused (`Busy`) instead of writing over
    the first. Where there is no lock to take (no ``fcntl``, a read-only directory,
    a filesystem without ``flock``) it holds nothing: saves are still atomic.
    """
    try:
        f = None if fcntl is None else open(os.path.join(directory, ".lock"), "a")
    except OSError:  # a read-only directory: nothing writes there meanwhile
        f = None
    if f is None:
        yield False
        return
    with f:
        try:
            fcntl.flock(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
                        | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise Busy(f"{directory} is in use by another process (another run training "
                       "there?): wait for it to finish, or use another directory") from None
        except OSError as e:  # ENOLCK, ENOSYS...: this filesystem has no flock
            warnings.warn(f"cannot lock {directory} ({e.strerror or e}): going on without",
                          stacklevel=3)
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale_temporaries(directory, before=None):
    """Deletes the temporary directories of saves that were killed (SIGKILL, power
    loss) before they could clean up: all of them, or those last modified before
    ``before``."""
    for n in os.listdir(directory):
        path = os.path.join(directory, n)
        try:
            if (n.startswith(_TMP) and os.path.isdir(path) and not os.path.islink(path)
                    and (before is None or os.path.getmtime(path) < before)):
                shutil.rmtree(path, ignore_errors=True)
        except OSError:  # removed meanwhile
            pass


def name(step):
    """The directory name of step's checkpoint, ``ckpt-<step, 9 digits>``."""
    return f"{PREFIX}{step:09d}"


def _step(path):
    return int(os.path.basename(path)[len(PREFIX):])


def step_of(entry):
    """The step of a file name that `name` gives, or None for any other name."""
    digits = entry[len(PREFIX):]
    return int(digits) if entry.startswith(PREFIX) and digits.isdigit() and (
        entry == name(int(digits))) else None


def list_checkpoints(directory):
    """Checkpoint directories (named as `save` names them), oldest first; other entries
    are ignored."""
    if not os.path.isdir(directory):
        return []
    paths = [os.path.join(directory, n) for n in os.listdir(directory) if step_of(n) is not None]
    return sorted((p for p in paths if os.path.isdir(p)), key=_step)


def _read(path, template, validate):
    with open(os.path.join(path, "manifest.json")) as f:
        try:
            manifest = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"manifest.json is not valid JSON ({e})") from e
    if not isinstance(manifest, dict):
        raise ValueError(f"manifest.json holds a {type(manifest).__name__}, not an object")
    # (manifests written before the digest existed have neither it nor a format, and are
    # read as they are)
    if ("manifest_sha256" in manifest or "format" in manifest) and (
            _digest(manifest) != manifest.get("manifest_sha256")):
        raise OSError("manifest.json does not match its own checksum")
    missing = [k for k in ("step", "sha256", "leaves", "meta") if k not in manifest]
    if missing:
        raise ValueError(f"manifest.json has no {', '.join(map(repr, missing))}")
    if validate is not None:
        validate(manifest["meta"])
    if callable(template):
        template = template(manifest["meta"])
    arrays = os.path.join(path, "arrays.npz")
    if sha256(arrays) != manifest["sha256"]:
        raise OSError("arrays.npz does not match the checksum in manifest.json")
    with np.load(arrays, allow_pickle=False) as data:
        leaves = [data[f"leaf_{i:05d}"] for i in range(len(manifest["leaves"]))]
    for x, (shape, dtype) in zip(leaves, manifest["leaves"]):
        if list(x.shape) != shape or str(x.dtype) != dtype:
            raise OSError("an array does not match the manifest")
    want, treedef = jax.tree_util.tree_flatten_with_path(template)
    if len(want) != len(leaves):
        raise CheckpointError(f"{path} holds {len(leaves)} arrays and this model has "
                              f"{len(want)}: it was written by another model or configuration")
    for (where, w), x in zip(want, leaves):
        if tuple(np.shape(w)) != x.shape or np.dtype(w.dtype) != x.dtype:
            raise CheckpointError(
                f"{path} holds {x.dtype}{list(x.shape)} where this model has "
                f"{np.dtype(w.dtype)}{list(np.shape(w))} (at {jax.tree_util.keystr(where)}): "
                "it was written by another model or configuration")
    return jax.tree.unflatten(treedef, leaves), manifest


def restore_latest(directory, template, validate=None):
    """``(tree, manifest)`` of the newest checkpoint that loads, or ``None`` if there
    is no checkpoint.

    ``template`` is the pytree to restore into, or a function giving it from a
    checkpoint's metadata (for a caller that learns the model from the run itself).
    Unreadable checkpoints (truncated, corrupted) are skipped with a warning; when
    there are checkpoints but none of them loads, `NoReadableCheckpoint` is raised (a
    run must not start afresh over them). One written for another model raises
    `CheckpointError`, as does ``validate(meta)`` (called on each manifest's
    metadata) when it objects.
    """
    if not os.path.isdir(directory):
        return None
    with locked(directory, shared=True):
        paths = list_checkpoints(directory)
        for path in reversed(paths):
            try:
                return _read(path, template, validate)
            except CheckpointError:
                raise
            except (OSError, ValueError, KeyError, TypeError, EOFError) as e:
                warnings.warn(f"skipping unreadable checkpoint {path}: {e}", stacklevel=2)
    if paths:
        raise NoReadableCheckpoint(
            f"none of the {len(paths)} checkpoints in {directory} can be read (see the "
            "warnings above); they are left as they are")
    return None
