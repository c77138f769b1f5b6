"""Short progress lines on a terminal from fairseq's JSON log lines (stdin -> stdout).

    fairseq-train ... --log-format json 2>&1 | tee -a train.log | python3 scripts/progress_view.py

The launchers (scripts/train.sh, train_torchrun.sh, train_slurm.sh) pipe their output through it
when standard output is a terminal: train.log keeps fairseq's JSON lines, which the plotting and
study tools read, and the terminal shows

    00:07:23 train  update 25      loss 13.359  ppl 10209  moe_loss 0.0162  wps 1977  lr 0.000125
    00:09:01 valid  update 50      loss 9.812   ppl 898.3  moe_loss 0.0150

Every other line (fairseq's set-up, warnings, errors and tracebacks) passes through unchanged.
Standard library only, so that it starts at once.
"""
import json
import re
import sys

# "2026-12-06 00:07:23 | INFO | train_inner | {...}" and "... | valid | {...}" (also "train", the epoch summary)
JSON_LINE = re.compile(r"^(?:\S+ (\d\d:\d\d:\d\d) \| \w+ \| )?(train_inner|train|valid)\S* \| (\{.*\})\s*$")
SHOWN = ("loss", "ppl", "moe_loss", "moe_overflow", "wps", "lr")


def view(line: str) -> str:
    """The short form of one of fairseq's JSON progress lines, or the line unchanged."""
    m = JSON_LINE.match(line.rstrip("\n"))
    if not m:
        return line
    try:
        rec = json.loads(m.group(3))
    except ValueError:
        return line
    clock, kind = m.group(1) or "", m.group(2)
    prefix = "valid_" if kind == "valid" else "train_" if kind == "train" else ""
    update = rec.get("num_updates", rec.get(f"{prefix}num_updates", "?"))
    parts = [f"{clock} {'train' if kind == 'train_inner' else kind:<5} update {update:<6}"]
    for key in SHOWN:
        value = rec.get(prefix + key, rec.get(key))
        if value is not None:
            parts.append(f"{key} {value}")
    return "  ".join(parts).strip() + "\n"


def main() -> int:
    for line in sys.stdin:
        sys.stdout.write(view(line))
        sys.stdout.flush()
    return 0


def cli_main():
    """The filter: a closed pipe or Ctrl-C ends it quietly."""
    try:
        sys.exit(main())
    except (BrokenPipeError, KeyboardInterrupt):
        sys.exit(0)


if __name__ == "__main__":
    cli_main()
