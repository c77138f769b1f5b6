"""Stand-ins for the project's console tools, for tests of the study drivers (hours of training
and evaluation in earnest): shell scripts put first on PATH."""
from pathlib import Path

# moe-evaluate: logs its arguments to BIN/eval.calls, copies the references (RAW/test.TGT) as its
# hypotheses in fairseq-generate's format, and scores BLEU 100 in every direction
MOE_EVALUATE = (
    "#!/bin/bash\n"
    'echo "$*" >> "$(dirname "$0")/eval.calls"\n'
    'while [ $# -gt 0 ]; do case $1 in --out) out=$2;; --raw-dir) raw=$2;; esac; shift; done\n'
    'mkdir -p "$out"\n'
    "for pair in en-de en-fr en-cs; do\n"
    '  awk \'{printf "S-%d\\tsrc\\nH-%d\\t-0.5\\t%s\\nD-%d\\t-0.5\\t%s\\n", NR-1, NR-1, $0, NR-1, $0}\' '
    '"$raw/test.${pair#*-}" > "$out/generate.test.$pair.txt"\n'
    "done\n"
    "echo '[{\"direction\": \"en-de\", \"bleu\": 100.0, \"signature\": \"s\"}, "
    "{\"direction\": \"en-fr\", \"bleu\": 100.0, \"signature\": \"s\"}, "
    "{\"direction\": \"en-cs\", \"bleu\": 100.0, \"signature\": \"s\"}]' > \"$out/results.json\"\n")


def write_tools(bin_dir: Path, **scripts: str):
    """Each keyword is a tool name with '_' for '-' (moe_evaluate=MOE_EVALUATE), written executable."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, text in scripts.items():
        tool = bin_dir / name.replace("_", "-")
        tool.write_text(text)
        tool.chmod(0o755)
