"""Generated sections of hand-written Markdown (docs/results.md, the README's study summary): the
text between a begin and an end marker is rewritten by a report, the prose around it is kept."""
from ..atomic_files import atomic_write_text
from ..moe.errors import MoEUsageError


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
