"""fairseq-interactive --user-dir moe_fairseq with the multilingual language-token flags, on a
consolidated and on an expert-sharded checkpoint: sentences piped in get the very translations
fairseq-generate gives for the same (binarized) sentences."""
import subprocess

import pytest

from cli_helpers import USER_DIR, cli, generate_cmd, hypotheses, lang_pairs, make_tiny_corpus, run, train_cmd
from moe_fairseq.tools.reshard import reshard


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_tiny_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory):
    # dropless: a capacity limit would make a token's route depend on the rest of its batch, and
    # the two commands batch the sentences differently
    save = tmp_path_factory.mktemp("top2")
    run(train_cmd(data, save, "--moe-router", "top2", "--moe-dropless", max_update=40))
    return save / "checkpoint_last.pt"


def interactive(data, path, lines, target):
    cmd = [cli("fairseq-interactive"), data, "--user-dir", USER_DIR, "--task", "translation_multi_moe",
           "--lang-pairs", lang_pairs(), "--encoder-langtok", "src", "--decoder-langtok",
           "--source-lang", "en", "--target-lang", target, "--path", path, "--beam", "2",
           "--buffer-size", "8", "--batch-size", "8", "--cpu"]
    proc = subprocess.run([str(c) for c in cmd], input="\n".join(lines) + "\n", capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return hypotheses(proc.stdout)


@pytest.mark.parametrize("target,layout", [("de", "consolidated"), ("fr", "sharded")])
def test_interactive_translates_like_generate(data, checkpoint, target, layout, tmp_path):
    sources = (data.parent / "raw" / "test.en").read_text().splitlines()
    want = hypotheses(run(generate_cmd(data, checkpoint, target=target)).stdout)
    assert sorted(want) == list(range(len(sources)))
    assert sum(1 for _, hyp in want.values() if hyp.strip()) > len(sources) // 2, "untrained: empty outputs"
    path = checkpoint if layout == "consolidated" else reshard(str(checkpoint), str(tmp_path / "sharded"), world_size=2)
    got = interactive(data, path, sources, target)
    assert sorted(got) == sorted(want)
    for i, (score, hyp) in want.items():
        assert got[i][1] == hyp, i
        assert abs(got[i][0] - score) < 1e-4, i
    # the target language token chose the language: every word is of the target's vocabulary
    assert all(w.startswith(target) for _, hyp in got.values() for w in hyp.split())
