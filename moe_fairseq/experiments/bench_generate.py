"""Decoding speed: fairseq's SequenceGenerator (in-process) on a test set, MoE against its dense twin.

  python scripts/bench_generate.py --data data-bin/multi30k --out docs/bench_generate.json \
      [--configs dense,moe_top2,smoe_dropout] [--checkpoints NAME=CKPT,...] [--pair en-de] \
      [--split test] [--sentences 128] [--batch-sizes 1,16,128] [--beams 1,5] [--smoe-ks 1,2,4,8] \
      [--fixed-len 20] [--repeats 5] [--threads 2] [--model-args "--encoder-layers 1 ..."]
      [--system-rows ROWS.json [--bleu-raw-dir RAW] [--bleu-pairs en-de,en-fr,en-cs] [--rss]]

Models.  Each of --configs (configs/multi30k/NAME.args) is built with random initialisation
(seed 1) from its config, exactly as fairseq-train would build it: `dense` is the dense twin of
`moe_top2` with the same dims and equal active FFN compute (configs/README.md).  Or
--checkpoints NAME=PATH,... loads trained models instead (their own dims; the study's checkpoints
of the same configs are the fair comparison).  Every model whose routers are SMoE-Dropout's
random router is timed once per evaluation k of --smoe-ks (labels NAME_k1, NAME_k2, ...), the
self-slimmable compute knob.  --model-args adds fairseq flags to every config (e.g. smaller dims
for a smoke test); --lang-pairs replaces the configs' directions (the data must have them).

Decoding.  The first --sentences sentences of --split for --pair, in order, are cut into batches
of B sentences for each B of --batch-sizes and translated with `task.inference_step` (the
generator fairseq-generate uses, with the direction's language tokens) for each beam size of
--beams.  With --fixed-len L (the default for random initialisation, where an untrained model's
output length is arbitrary) every hypothesis is exactly L tokens plus end-of-sentence
(min_len = max_len = L), so every model decodes the same number of steps; with --fixed-len 0
trained models decode as fairseq-generate does (max_len_b 200).

Timing.  One untimed batch per (model, B, beam) first; then --repeats rounds, each timing every
(model, B, beam) once over all --sentences, the models interleaved and their order rotated each
round, so that the machine's drift touches every model alike.  Throughput is the tokens of the
best hypotheses (fairseq-generate's count: target tokens including end-of-sentence) per second
of wall-clock time.  Reported per (model, B, beam): the median over rounds of tokens/s and
sentences/s, every round's value, and against --reference (default `dense`): the median over
rounds of (model / reference in that round) and the ratio of the medians.

Timing.  Beside wall-clock time each round records this process's CPU seconds (tokens per
CPU-second: on a host whose cores are shared, what the decoding itself cost, without the time it
waited for a core) and the load average after each round.

Systems (--system-rows, e.g. fp32 and int8 checkpoints of moe-quantize).  One row per
(checkpoint, batch, beam): median tokens/s, the paired ratio to --reference, the file size, with
--bleu-raw-dir sacrebleu BLEU per direction of --bleu-pairs on the whole --split (moe-evaluate,
beam 5), and with --rss the resident memory of a fresh process that loads the checkpoint and
translates the sentences once at the largest batch and beam (after, and the high-water mark).

Attribution (--attribute).  After the timed rounds, one more pass per (model, B, beam) with
forward hooks on every layer's fc1 and fc2 gives the seconds spent inside the FFN sub-layers
(a MoE layer takes fc1's place), encoder and decoder apart, and ms per call; a second pass under
torch.profiler lists the operators inside those sub-layers by CPU time per call.  So a MoE
model's shortfall against its dense twin can be put where it is: in its FFN sub-layers, or not.
The same profiled pass splits a decoder step (the pass over its decoder steps) into the weight
GEMMs (fp32 or int8), the other operators, and the time between operators (Python, and waiting
for a core).

Writes the JSON to --out and prints a markdown table.  Run it on a quiet machine: nothing else
should be running (docs/benchmarks.md).
"""
import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

from ..atomic_files import atomic_write_json
from ..moe.errors import MoEUsageError
from ..tools.expert_usage import USER_DIR, direction_task, load_model, sentence_batches
from .launch import REPO, config_args


def int_list(text, flag):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise MoEUsageError(f"{flag} must be a comma-separated list of positive integers (got {text!r})")
    return values


def build_from_config(name, data, model_args, lang_pairs, seed):
    """(model in eval mode, its training args) with random initialisation, as fairseq-train builds it."""
    import torch
    from fairseq import options, tasks

    # --user-dir alone registers nothing here: fairseq skips importing a user directory whose
    # package (moe_fairseq) is already imported, as it is by this script
    from .. import plugin  # noqa: F401

    config = REPO / "configs" / "multi30k" / f"{name}.args"
    argv = [data, "--user-dir", USER_DIR, *config_args(config), "--cpu", "--seed", str(seed), *model_args]
    if lang_pairs:
        argv += ["--lang-pairs", lang_pairs]
    args = options.parse_args_and_arch(options.get_training_parser(), argv)
    task = tasks.setup_task(args)
    torch.manual_seed(seed)
    return task.build_model(args).eval(), args


def routers_of(model):
    from ..moe.collect import moe_layers

    return [layer.router for layer in moe_layers(model)]


def active_k(router):
    """Experts per token the router uses now (evaluation mode): noisy_topk and random can change it."""
    return router.current_k() if hasattr(router, "current_k") else router.k


class Variant:
    """One timed model: a built model, its per-direction task and, for the random router, its k."""

    def __init__(self, label, model, task_args, eval_k=None, fast_path=True):
        self.label, self.model, self.task_args, self.eval_k = label, model, task_args, eval_k
        self.fast_path = fast_path  # False: MoE decoder steps through the general dispatch
        self.task = None

    def activate(self):
        """Set this variant's evaluation k and decode path (variants of one model share it)."""
        from ..moe.collect import moe_layers

        if self.eval_k is not None:
            from ..models.transformer_moe import apply_eval_overrides

            apply_eval_overrides(self.model, self.eval_k)
        for layer in moe_layers(self.model):
            layer.decode_fast_path = self.fast_path

    def describe(self):
        routers = routers_of(self.model)
        return {"label": self.label, "parameters": sum(p.numel() for p in self.model.parameters()),
                "moe_layers": len(routers), "experts": routers[0].num_experts if routers else 0,
                "router": type(routers[0]).__name__ if routers else None, "eval_top_k": self.eval_k}


def make_variants(args):
    variants = []
    models = []
    model_args = args.model_args.split() if args.model_args else []
    for name in filter(None, (args.configs or "").split(",")):
        model, train_args = build_from_config(name, args.data, model_args, args.lang_pairs, args.seed)
        models.append((name, model, train_args))
    for item in filter(None, (args.checkpoints or "").split(",")):
        if "=" not in item:
            raise MoEUsageError(f"--checkpoints takes NAME=PATH items (got {item!r})")
        name, path = item.split("=", 1)
        if not os.path.isfile(path):
            raise MoEUsageError(f"--checkpoints: {path} does not exist")
        model, cfg = load_model(path, args.data)
        models.append((name, model, cfg.task))
    if not models:
        raise MoEUsageError("nothing to time: give --configs and/or --checkpoints")
    labels = [name for name, _, _ in models]
    if len(set(labels)) != len(labels):
        raise MoEUsageError(f"model names must be unique (got {', '.join(labels)})")
    for name, model, task_args in models:
        routers = routers_of(model)
        if routers and type(routers[0]).__name__ == "RandomRouter":
            for k in args.smoe_ks:
                if k > routers[0].num_experts:
                    raise MoEUsageError(f"--smoe-ks: k = {k} exceeds the {routers[0].num_experts} experts of {name}")
                variants.append(Variant(f"{name}_k{k}", model, task_args, k))
        else:
            variants.append(Variant(name, model, task_args))
        if routers and args.general_path:  # the same model again, decoder steps on the general dispatch
            variants += [Variant(f"{v.label}_general", model, task_args, v.eval_k, fast_path=False)
                         for v in list(variants) if v.model is model]
    return variants


def generator_args(beam, fixed_len):
    if fixed_len:
        # min_len = max_len: end-of-sentence is forbidden before step L and forced at step L
        return argparse.Namespace(beam=beam, min_len=fixed_len, max_len_a=0, max_len_b=fixed_len)
    return argparse.Namespace(beam=beam)


def decode(variant, batches, generator):
    """(seconds, sentences, tokens, cpu seconds) of translating `batches` once.  CPU seconds are
    this process's (all its threads): on a loaded host they leave out the time it waited for a
    core, which wall-clock time counts."""
    import torch

    sentences = tokens = 0
    start, cpu_start = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for batch in batches:
            hypos = variant.task.inference_step(generator, [variant.model], batch)
            sentences += len(hypos)
            tokens += sum(len(h[0]["tokens"]) for h in hypos)
    return time.perf_counter() - start, sentences, tokens, time.process_time() - cpu_start


class FFNTimer:
    """Wall time inside the FFN sub-layers of a model, by forward hooks on every layer's fc1 (entry)
    and fc2 (exit): fairseq runs fc1, activation, dropout and fc2 inline, and a MoE layer takes
    fc1's place with fc2 an identity, so the same two hooks cover a dense FFN and a MoE layer.
    With `profile`, each sub-layer call is also a torch.profiler range, so that the operators
    inside the FFNs can be told from the rest of the step."""

    def __init__(self, model, profile=False):
        self.seconds = {"encoder": 0.0, "decoder": 0.0}
        self.calls = {"encoder": 0, "decoder": 0}
        self.profile, self.handles, self._open = profile, [], None
        for name, layer in model.named_modules():
            if hasattr(layer, "fc1") and hasattr(layer, "fc2"):
                side = "decoder" if name.startswith("decoder") else "encoder"
                self.handles.append(layer.fc1.register_forward_pre_hook(self._enter(side)))
                self.handles.append(layer.fc2.register_forward_hook(self._exit))

    def _enter(self, side):
        def hook(module, inputs):
            rng = None
            if self.profile:
                import torch

                rng = torch.profiler.record_function("ffn_sublayer")
                rng.__enter__()
            self._open = (side, time.perf_counter(), rng)
        return hook

    def _exit(self, module, inputs, output):
        side, start, rng = self._open
        self.seconds[side] += time.perf_counter() - start
        self.calls[side] += 1
        if rng is not None:
            rng.__exit__(None, None, None)

    def remove(self):
        for h in self.handles:
            h.remove()


def attribute(variant, batches, generator, top_ops=12):
    """One more (untimed-round) translation of `batches` with FFNTimer: seconds in total, in the
    encoder's and the decoder's FFN sub-layers, per-call ms; and the operators inside the FFN
    sub-layers by total CPU time (torch.profiler, a second pass)."""
    import torch

    timer = FFNTimer(variant.model)
    try:
        seconds, _, _, _ = decode(variant, batches, generator)
    finally:
        timer.remove()
    out = {"seconds": seconds,
           **{f"{side}_ffn_seconds": timer.seconds[side] for side in timer.seconds},
           **{f"{side}_ffn_calls": timer.calls[side] for side in timer.calls},
           **{f"{side}_ffn_ms_per_call": 1000 * timer.seconds[side] / max(1, timer.calls[side])
              for side in timer.seconds}}
    timer = FFNTimer(variant.model, profile=True)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            profiled_seconds = decode(variant, batches, generator)[0]
    finally:
        timer.remove()
    ops, calls = {}, 0
    for event in prof.events():
        if event.name == "ffn_sublayer":
            calls += 1
            for child in event.cpu_children:
                ops[child.name] = ops.get(child.name, 0.0) + child.cpu_time_total / 1000
    out["ffn_ops_ms_per_call"] = {name: round(ms / max(1, calls), 4)
                                  for name, ms in sorted(ops.items(), key=lambda kv: -kv[1])[:top_ops]}
    out.update(step_profile(prof, profiled_seconds, top_ops))
    return out


# Operators that multiply by a weight matrix, fp32 or int8 (the linear layers, the experts' GEMMs).
GEMM_OPS = ("aten::addmm", "aten::mm", "quantized::linear_dynamic", "aten::_weight_int8pack_mm")


def step_profile(prof, seconds, top_ops=12) -> dict:
    """Where the time of a profiled pass (`seconds` of wall-clock) goes, per decoder step (the
    pass's time over its decoder steps: the encoder and the search included): the operators' own
    CPU time, the weight GEMMs (GEMM_OPS) apart from the rest, and the time between operators
    (Python: fairseq's generator and modules, the plugin's routing code; and waiting for a core)."""
    averages = prof.key_averages()
    steps = max(1, sum(e.count for e in averages if e.key == "EnsembleModel: forward_decoder"))
    # record_function ranges (fairseq's, --attribute's own) are not operators: their own time is
    # time between the operators inside them
    own = {e.key: e.self_cpu_time_total / 1000 for e in averages
           if not e.key.startswith("EnsembleModel") and e.key != "ffn_sublayer"}
    gemm = sum(own.get(name, 0.0) for name in GEMM_OPS)
    in_ops = sum(own.values())
    return {"decoder_steps": steps, "step_ms": 1000 * seconds / steps, "step_gemm_ms": gemm / steps,
            "step_other_ops_ms": (in_ops - gemm) / steps, "step_between_ops_ms": (1000 * seconds - in_ops) / steps,
            "ops_ms_per_step": {name: round(ms / steps, 4)
                                for name, ms in sorted(own.items(), key=lambda kv: -kv[1])[:top_ops]}}


def run(args):
    import torch

    torch.set_num_threads(args.threads)
    variants = make_variants(args)
    batches, generators = {}, {}
    for v in variants:
        v.task = direction_task(argparse.Namespace(task=v.task_args), args.data, args.pair, args.split)
        dataset = v.task.dataset(args.split)
        for b in args.batch_sizes:
            batches[v.label, b] = sentence_batches(dataset, args.sentences, b)
        for beam in args.beams:
            generators[v.label, beam] = v.task.build_generator([v.model], generator_args(beam, args.fixed_len))
    settings = [(b, beam) for b in args.batch_sizes for beam in args.beams]
    records = {(v.label, b, beam): {"seconds": [], "tokens_per_s": [], "sentences_per_s": [], "cpu_seconds": [],
                                    "tokens_per_cpu_s": []}
               for v in variants for b, beam in settings}
    for v in variants:  # warm-up: one batch of every setting
        v.activate()
        for b, beam in settings:
            decode(v, batches[v.label, b][:1], generators[v.label, beam])
    args.load_average_rounds = []
    for r in range(args.repeats):
        for b, beam in settings:
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for v in order:
                v.activate()
                record(records[v.label, b, beam], v, *decode(v, batches[v.label, b], generators[v.label, beam]))
        args.load_average_rounds.append(list(os.getloadavg()))
        print(f"round {r + 1}/{args.repeats} done", flush=True)
    rows = summarise(records, variants, settings, args.reference)
    if args.attribute:
        for row in rows:
            v = next(v for v in variants if v.label == row["model"])
            v.activate()
            b, beam = row["batch_sentences"], row["beam"]
            row["attribution"] = attribute(v, batches[v.label, b], generators[v.label, beam])
    return variants, rows


def record(rec, variant, seconds, sentences, tokens, cpu_seconds):
    rec.update(sentences=sentences, tokens=tokens)
    rec["seconds"].append(seconds)
    rec["tokens_per_s"].append(tokens / seconds)
    rec["sentences_per_s"].append(sentences / seconds)
    rec["cpu_seconds"].append(cpu_seconds)
    rec["tokens_per_cpu_s"].append(tokens / max(cpu_seconds, 1e-9))
    rec["eval_top_k_used"] = sorted({active_k(router) for router in routers_of(variant.model)})


def summarise(records, variants, settings, reference):
    labels = [v.label for v in variants]
    if reference is not None and reference not in labels:
        raise MoEUsageError(f"--reference {reference} is not one of the timed models ({', '.join(labels)})")
    rows = []
    for b, beam in settings:
        for label in labels:
            rec = records[label, b, beam]
            row = {"model": label, "batch_sentences": b, "beam": beam, "sentences": rec["sentences"],
                   "tokens": rec["tokens"], "eval_top_k_used": rec["eval_top_k_used"],
                   "tokens_per_s_median": statistics.median(rec["tokens_per_s"]),
                   "sentences_per_s_median": statistics.median(rec["sentences_per_s"]),
                   "tokens_per_s_all": rec["tokens_per_s"], "seconds_all": rec["seconds"],
                   "tokens_per_cpu_s_median": statistics.median(rec["tokens_per_cpu_s"]),
                   "cpu_seconds_all": rec["cpu_seconds"]}
            if reference is not None:
                ref = records[reference, b, beam]["tokens_per_s"]
                row["ratio_to_reference_paired_median"] = statistics.median(
                    [x / y for x, y in zip(rec["tokens_per_s"], ref)])
                row["ratio_to_reference_of_medians"] = row["tokens_per_s_median"] / statistics.median(ref)
                row["cpu_ratio_to_reference_paired_median"] = statistics.median(
                    [x / y for x, y in zip(rec["tokens_per_cpu_s"], records[reference, b, beam]["tokens_per_cpu_s"])])
            rows.append(row)
    return rows


def checkpoint_paths(args) -> dict:
    return dict(item.split("=", 1) for item in filter(None, (args.checkpoints or "").split(",")))


def bleu_per_direction(path, args) -> dict:
    """sacrebleu BLEU of the whole --split per direction of --bleu-pairs: moe-evaluate (beam 5,
    fairseq-generate with the plugin), as the study scores its checkpoints."""
    from ..tools.evaluate import main as evaluate_main

    rows = evaluate_main([args.data, "--path", path, "--lang-pairs", args.bleu_pairs, "--raw-dir", args.bleu_raw_dir,
                          "--split", args.split, "--beam", "5", "--cpu"])
    return {row["direction"]: row["bleu"] for row in rows}


def rss_probe(path, args) -> dict:
    """Resident memory of a fresh process that loads `path` and translates the timed sentences
    once at the largest batch and beam: {"rss_mb": after, "peak_rss_mb": the high-water mark}."""
    import json
    import subprocess

    # the script, not this module's file: a module of the package runs only as part of it
    cmd = [sys.executable, str(REPO / "scripts" / "bench_generate.py"), "--rss-probe", path, "--data", args.data,
           "--pair", args.pair, "--split", args.split, "--sentences", str(args.sentences),
           "--batch-sizes", str(max(args.batch_sizes)), "--beams", str(max(args.beams)), "--threads", str(args.threads), "--fixed-len", str(args.fixed_len)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe of {path} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def probe_main(args):
    """The child of rss_probe: load, translate once, print VmRSS and VmHWM (MB) as JSON."""
    import json

    import torch

    torch.set_num_threads(args.threads)
    model, cfg = load_model(args.rss_probe, args.data)
    variant = Variant("probe", model, cfg.task)
    variant.task = direction_task(argparse.Namespace(task=cfg.task), args.data, args.pair, args.split)
    batches = sentence_batches(variant.task.dataset(args.split), args.sentences, args.batch_sizes[0])
    decode(variant, batches, variant.task.build_generator([model], generator_args(args.beams[0], args.fixed_len)))
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kb = {key: int(status[key].split()[0]) for key in ("VmRSS", "VmHWM")}
    print(json.dumps({"rss_mb": round(kb["VmRSS"] / 1024, 1), "peak_rss_mb": round(kb["VmHWM"] / 1024, 1)}))


def system_rows(rows, args) -> list:
    """One row per (checkpoint, batch, beam) in the form of docs/bench_int8.json: tokens/s (median
    of the rounds), its paired ratio to --reference, BLEU per direction, file size and memory."""
    facts = {}
    for name, path in checkpoint_paths(args).items():
        facts[name] = {"file_mb": round(os.path.getsize(path) / 2 ** 20, 2),
                       "bleu": bleu_per_direction(path, args) if args.bleu_raw_dir else None,
                       **(rss_probe(path, args) if args.rss else {"rss_mb": None, "peak_rss_mb": None})}
    out = []
    for r in rows:
        if r["model"] not in facts:
            continue
        row = {"system": r["model"], "batch": r["batch_sentences"], "beam": r["beam"],
               "tokens_per_s": round(r["tokens_per_s_median"], 1)}
        if args.reference:
            row[f"ratio_to_{args.reference}"] = round(r["ratio_to_reference_paired_median"], 3)
        row.update(facts[r["model"]])
        row["tokens_per_cpu_s"] = round(r["tokens_per_cpu_s_median"], 1)
        if args.reference:
            row[f"cpu_ratio_to_{args.reference}"] = round(r["cpu_ratio_to_reference_paired_median"], 3)
        out.append(row)
    return out


def markdown(rows, reference):
    head = "| model | batch | beam | tokens/s (median) | sentences/s |"
    head += f" / {reference} (paired) |" if reference else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        line = (f"| {r['model']} | {r['batch_sentences']} | {r['beam']} | {r['tokens_per_s_median']:.1f} | "
                f"{r['sentences_per_s_median']:.2f} |")
        if reference:
            line += f" {r['ratio_to_reference_paired_median']:.2f}x |"
        lines.append(line)
    return "\n".join(lines)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", required=True, help="data-bin directory with the --split data of --pair")
    p.add_argument("--out", help="JSON file to write (required but with --rss-probe)")
    p.add_argument("--configs", default="dense,moe_top2,smoe_dropout",
                   help="configs/multi30k/NAME.args to build with random initialisation ('' for none)")
    p.add_argument("--checkpoints", help="NAME=PATH,... trained checkpoints to time as well")
    p.add_argument("--reference", default="dense", help="model the ratios are taken against ('' for none)")
    p.add_argument("--pair", default="en-de", help="direction to translate (default en-de)")
    p.add_argument("--lang-pairs", help="directions of the configs' task (default: the configs' own)")
    p.add_argument("--split", default="test")
    p.add_argument("--sentences", type=int, default=128, help="sentences translated per timing (default 128)")
    p.add_argument("--batch-sizes", default="1,16,128", help="sentences per batch (default 1,16,128)")
    p.add_argument("--beams", default="1,5", help="beam sizes (default 1,5)")
    p.add_argument("--smoe-ks", default="1,2,4,8", help="evaluation k of random-router models (default 1,2,4,8)")
    p.add_argument("--fixed-len", type=int,
                   help="every hypothesis exactly L tokens (default 20 with --configs only, else 0 = natural)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--seed", type=int, default=1, help="initialisation seed of the config models")
    p.add_argument("--attribute", action="store_true",
                   help="after the timed rounds, one more pass per setting timing the FFN sub-layers "
                        "(forward hooks) and profiling the operators inside them")
    p.add_argument("--model-args", help="extra fairseq flags for every config, e.g. smaller dims for a smoke test")
    p.add_argument("--general-path", action="store_true",
                   help="also time every MoE model with its decoder steps on the general dispatch (label NAME_general): "
                        "the decoder-step path of moe/decode.py against what it replaces, in the same rounds")
    p.add_argument("--system-rows", metavar="JSON",
                   help="also write one row per (checkpoint, batch, beam) to this file: tokens/s, the paired ratio "
                        "to --reference, BLEU (--bleu-raw-dir), file size and memory (--rss)")
    p.add_argument("--bleu-raw-dir", help="with --system-rows: score each checkpoint with moe-evaluate (beam 5) "
                                          "on the whole --split, references in this directory")
    p.add_argument("--bleu-pairs", default="en-de,en-fr,en-cs", help="directions scored with --bleu-raw-dir")
    p.add_argument("--rss", action="store_true",
                   help="with --system-rows: each checkpoint's resident memory in a fresh process after "
                        "translating the sentences once at the largest batch and beam")
    p.add_argument("--rss-probe", metavar="CKPT", help=argparse.SUPPRESS)  # the child of --rss
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.batch_sizes = int_list(args.batch_sizes, "--batch-sizes")
        args.beams = int_list(args.beams, "--beams")
        args.smoe_ks = int_list(args.smoe_ks, "--smoe-ks")
        if args.fixed_len is None:
            args.fixed_len = 0 if args.checkpoints else 20
        if args.fixed_len < 0 or args.repeats < 1 or args.sentences < 1 or args.threads < 1:
            raise MoEUsageError("--fixed-len must be >= 0; --repeats, --sentences and --threads >= 1")
        args.reference = args.reference or None
        import logging

        logging.getLogger("fairseq").setLevel(logging.WARNING)
        if args.rss_probe:
            return probe_main(args)
        if not args.out:
            raise MoEUsageError("--out is required")
        if (args.bleu_raw_dir or args.rss) and not args.system_rows:
            raise MoEUsageError("--bleu-raw-dir and --rss go with --system-rows")
        variants, rows = run(args)
        systems = system_rows(rows, args) if args.system_rows else None
    except MoEUsageError as e:
        sys.exit(f"bench_generate: error: {e}")
    import torch

    meta = {"data": args.data, "pair": args.pair, "split": args.split, "sentences": args.sentences,
            "batch_sizes": args.batch_sizes, "beams": args.beams, "fixed_len": args.fixed_len,
            "repeats": args.repeats, "threads": args.threads, "reference": args.reference,
            "attribute": args.attribute, "general_path": args.general_path,
            "configs": args.configs, "checkpoints": args.checkpoints, "model_args": args.model_args,
            "models": [v.describe() for v in variants], "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
            "load_average": list(os.getloadavg()), "load_average_rounds": args.load_average_rounds,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    out = Path(args.out)
    atomic_write_json(out, {"meta": meta, "results": rows})
    print(markdown(rows, args.reference))
    print(f"wrote {out}")
    if systems is not None:
        atomic_write_json(Path(args.system_rows), systems)
        print(f"wrote {args.system_rows}")
    return {"meta": meta, "results": rows, "systems": systems}


cli_main = main  # main prints its own one-line errors


if __name__ == "__main__":
    cli_main()
