"""Writing files so that a crash, a kill or a full disk leaves the previous files whole.

The one atomic writer of the project: the new content goes to a temporary file beside each
target (same file system, so the rename is atomic), is fsynced, and replaces the target with
os.replace; on any error the temporary files are removed.  Checkpoints (checkpoint/sharded.py),
the records, tables and reports of scripts/ that later steps read back or commit, and data_prep's
outputs all write through here.  Temporary names are `<file>.tmp<pid>` (checkpoint/sharded.
remove_stale_temporaries recognises them), or hidden `.<file>.<random>.tmp` for data
directories, whose readers skip dot files.
"""
import json
import os
import shutil
import tempfile
from contextlib import contextmanager, suppress

MODES = ("w", "wb")


def _missing_directories(paths):
    """The directories above `paths` that do not exist yet, parents first."""
    missing = []
    for directory in sorted({os.path.dirname(os.path.abspath(p)) for p in paths}):
        chain = []
        while not os.path.isdir(directory):
            chain.append(directory)
            directory = os.path.dirname(directory)
        missing += [d for d in reversed(chain) if d not in missing]
    return missing


def _open_temporary(path: str, mode: str, hidden: bool):
    """(temporary path, handle open for writing) beside `path`."""
    text = {} if "b" in mode else {"encoding": "utf-8", "newline": "\n"}
    if hidden:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)),
                                   prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        return tmp, os.fdopen(fd, mode, **text)
    tmp = f"{path}.tmp{os.getpid()}"
    return tmp, open(tmp, mode, **text)


@contextmanager
def atomic_outputs(paths, mode: str = "w", hidden: bool = False):
    """One handle per path (text in UTF-8 for mode "w", or "wb"), all made atomic together:
    every temporary file is complete and fsynced before the first is renamed into place, so a
    failure while writing never leaves one output new and another old.  On any exception
    (KeyboardInterrupt included) the temporaries are deleted, the files at `paths` are left as
    they were, and the directories this call created are removed again if left empty."""
    if mode not in MODES:
        raise ValueError(f"atomic_outputs writes whole files: mode 'w' or 'wb' (got {mode!r})")
    paths = [os.fspath(p) for p in paths]
    created = []
    for directory in _missing_directories(paths):
        try:
            os.mkdir(directory)
            created.append(directory)
        except FileExistsError:  # made meanwhile by another process, e.g. the other ranks
            pass  # writing their shards into the same directory: theirs, not ours to remove
    temps, handles, done = [], [], False
    try:
        for path in paths:
            tmp, handle = _open_temporary(path, mode, hidden)
            temps.append(tmp)
            handles.append(handle)
        yield handles
        for handle in handles:
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
        for tmp, path in zip(temps, paths):
            os.replace(tmp, path)
        done = True
    finally:
        for handle in handles:
            handle.close()
        if not done:
            for tmp in temps:
                with suppress(FileNotFoundError):
                    os.remove(tmp)
            for directory in reversed(created):
                with suppress(OSError):
                    os.rmdir(directory)


@contextmanager
def atomic_open(path, mode: str = "w"):
    """open(path, mode) for writing ("w" text in UTF-8, or "wb"), made atomic as above."""
    with atomic_outputs([path], mode) as (handle,):
        yield handle


def atomic_copy(src, dst) -> None:
    """Copy src over dst atomically (a full disk during the copy leaves dst as it was)."""
    with open(src, "rb") as source, atomic_open(dst, "wb") as target:
        shutil.copyfileobj(source, target)


def atomic_write_text(path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def atomic_write_json(path, obj, indent: int = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")
