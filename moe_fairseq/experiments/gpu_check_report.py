"""The one table of scripts/gpu_check.sh, and its JSON: every step's pass, fail or skip.

  python scripts/gpu_check_report.py ROWS.tsv --json OUT.json --device cpu --gpus 0 [--quick]

ROWS holds one line per result, "step<TAB>status<TAB>seconds<TAB>detail[<TAB>json data]" (written
by gpu_check.sh and scripts/gpu_check_fairseq.py).  Prints the table with a count per status;
exits 1 when a step failed (a skip is not a failure: its detail says why it was skipped).
"""
import argparse
import json
import sys
from pathlib import Path

from ..atomic_files import atomic_write_json

STATUSES = ("pass", "fail", "skip")


def read_rows(path):
    rows = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) not in (4, 5) or fields[1] not in STATUSES:
            raise SystemExit(f"gpu_check_report.py: {path}:{lineno}: not 'step<TAB>pass|fail|skip<TAB>seconds"
                             f"<TAB>detail[<TAB>json]': {line!r}")
        row = {"step": fields[0], "status": fields[1], "seconds": float(fields[2]), "detail": fields[3]}
        if len(fields) == 5 and fields[4] not in ("", "{}"):
            row["data"] = json.loads(fields[4])
        rows.append(row)
    return rows


def table(rows):
    width = max([len("step")] + [len(r["step"]) for r in rows])
    lines = [f"{'step':<{width}}  status  seconds  detail"]
    for r in rows:
        lines.append(f"{r['step']:<{width}}  {r['status'].upper():<6}  {r['seconds']:7.1f}  {r['detail']}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("rows")
    p.add_argument("--json", required=True, help="where to write the JSON report")
    p.add_argument("--device", required=True)
    p.add_argument("--gpus", type=int, required=True)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    rows = read_rows(args.rows)
    counts = {s: sum(r["status"] == s for r in rows) for s in STATUSES}
    report = {"device": args.device, "gpus_visible": args.gpus, "quick": args.quick, "ok": counts["fail"] == 0,
              "passed": counts["pass"], "failed": counts["fail"], "skipped": counts["skip"], "steps": rows}
    atomic_write_json(args.json, report)
    print(f"\n== gpu_check summary: DEVICE={args.device}, GPUs visible: {args.gpus}, QUICK={int(args.quick)}")
    print(table(rows))
    print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped; JSON: {args.json}")
    return 0 if report["ok"] else 1


def cli_main(argv=None):
    """The command line: exit status 1 when a step failed."""
    sys.exit(main(argv))


if __name__ == "__main__":
    cli_main()
