"""Writing a file so that a crash, a kill or a full disk leaves the previous file whole.

The new content goes to a temporary file beside the target (same file system, so the rename
is atomic), is fsynced, and replaces the target with os.replace; on any error the temporary
file is removed.  Checkpoints (checkpoint/sharded.py) and the records, tables and reports of
scripts/ that later steps read back or commit all write through here.  Temporary names are
`<file>.tmp<pid>`: checkpoint/sharded.remove_stale_temporaries recognises them.
"""
import json
import os
from contextlib import contextmanager

from .moe.errors import MoEUsageError


@contextmanager
def atomic_open(path, mode: str = "w"):
    """open(path, mode) for writing ("w" text in UTF-8, or "wb"), made atomic as above."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb' (got {mode!r})")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def atomic_write_json(path, obj, indent: int = 1) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def _split_section(text: str, begin: str, end: str, flag: str, path):
    if begin not in text or end not in text:
        raise MoEUsageError(f"{flag} {path} has no generated section ({begin} ... {end}): "
                            "add the two markers where it goes")
    head, rest = text.split(begin, 1)
    return head, rest.split(end, 1)[1]


def require_section(path, begin: str, end: str, flag: str) -> None:
    """Refuse, in one line naming `flag`, a Markdown file without the markers of a generated section
    (checked before long work, so that it does not fail at the end)."""
    _split_section(open(path, encoding="utf-8").read(), begin, end, flag, path)


def rewrite_section(path, begin: str, end: str, body: str, flag: str) -> None:
    """Replace what lies between the markers `begin` and `end` of a Markdown file by `body`,
    atomically; the rest of the file (hand-written prose) is kept."""
    head, tail = _split_section(open(path, encoding="utf-8").read(), begin, end, flag, path)
    if not body.endswith("\n"):
        body += "\n"
    atomic_write_text(path, f"{head}{begin}\n{body}{end}{tail}")
