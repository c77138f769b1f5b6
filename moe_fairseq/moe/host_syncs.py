"""Count the host synchronisations of MoE layer calls, on any device.

On CUDA a host sync (the CPU waits for the GPU: reading a value back, a kernel whose output
size depends on the data, a copy from pageable host memory) stalls the launch queue; a MoE
layer that syncs a dozen times per forward starves the GPU at small batch sizes.  CPU runs
cannot see this, so `HostSyncCounter` counts, on any device, the operations that synchronise
on CUDA:

- ops that read a value back or size their output from the data: `_local_scalar_dense`
  (`.item()`, `float(t)`, `bool(t)`, `if t:`), `nonzero`, `bincount`, `unique*`,
  `masked_select`, `repeat_interleave` without `output_size`, `equal`, `is_nonzero`;
- tensors made from host data (`torch.tensor(list)`, `torch.tensor(3.0)`: `lift_fresh`), which
  on CUDA are host-to-device copies;
- the Python-level reads that bypass the dispatcher on CPU: `Tensor.tolist`, `.cpu()`,
  `.numpy()`.

It is a proxy (a CPU run counts what would sync if the same code ran on CUDA), and it does not
depend on how the code is written: a refactor that moves a read-back elsewhere is still
counted.  On CUDA, `measure` also reports torch's own count (`torch.cuda.set_sync_debug_mode`).

    python -m moe_fairseq.moe.host_syncs [--device cuda] [--json OUT]

prints the counts of the standard scenarios (`SCENARIOS`), the ones the project budgets.
"""
import argparse
import collections
import contextlib
import json
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_SYNC_OPS = {"_local_scalar_dense", "nonzero", "bincount", "_unique", "_unique2", "unique_dim",
             "unique_consecutive", "unique_dim_consecutive", "masked_select", "equal", "is_nonzero",
             "lift_fresh", "lift_fresh_copy"}
_TENSOR_METHODS = ("tolist", "cpu", "numpy")


def _op_name(func) -> str:
    return func._schema.name.split("::")[-1]


class HostSyncCounter(TorchDispatchMode):
    """Within the block, `counts[op]` is the number of host syncs each op would cause on CUDA
    (see the module docstring); `total` their sum."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()
        self._saved = {}

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _op_name(func)
        if name in _SYNC_OPS or (name == "repeat_interleave" and kwargs.get("output_size") is None
                                 and (len(args) < 4 or args[3] is None)):
            self.counts[name] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        for method in _TENSOR_METHODS:
            original = getattr(torch.Tensor, method)
            self._saved[method] = original

            def counted(tensor, *args, _method=method, _original=original, **kwargs):
                self.counts[f"Tensor.{_method}"] += 1
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, method, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for method, original in self._saved.items():
                setattr(torch.Tensor, method, original)
            self._saved.clear()


@contextlib.contextmanager
def cuda_sync_debug_count():
    """torch's own count of synchronising CUDA calls in the block (`warn` mode, one warning
    each); yields a list whose length is that count after the block."""
    found = []
    before = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode(before)
    found.extend(w for w in caught if "synchroniz" in str(w.message))


# ------------------------------------------------------------------ the budgeted scenarios
def _layer(router: str, device, num_experts=8, model_dim=32, hidden=64, comm=None):
    from .config import MoEConfig
    from .layer import build_moe_layer

    cfg = MoEConfig(num_experts=num_experts, router=router, capacity_factor=1.0 if router == "top2" else None)
    return build_moe_layer(cfg, model_dim, hidden, comm=comm).to(device)


def _padded_batch(device, model_dim=32, seq=12, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(seq, batch, model_dim, generator=g).to(device)
    mask = torch.zeros(seq, batch, dtype=torch.bool)
    mask[-3:, 1] = True  # padding present, as in any real batch
    return x.requires_grad_(), mask.to(device)


def train_step_syncs(layer, x, mask):
    """Host syncs of one training forward + backward of `layer` (after a warm-up call)."""
    layer.train()
    for counting in (False, True):  # the first call fills per-device caches
        counter = HostSyncCounter()
        with counter if counting else contextlib.nullcontext():
            out = layer(x, mask)
            loss = out.float().pow(2).sum() + sum(layer.aux.losses.values())
            loss.backward()
    return counter


def decoder_step_syncs(layer, rows=5, model_dim=32):
    """Host syncs of one evaluation call on `rows` rows (a decoder step of beam `rows`), on the
    general path a GPU takes (the CPU-only decode path is switched off)."""
    layer.eval()
    layer.decode_fast_path = False
    x = torch.randn(1, rows, model_dim, device=next(layer.parameters()).device)
    with torch.no_grad():
        layer(x)
        counter = HostSyncCounter()
        with counter:
            layer(x)
    return counter


def statistics_syncs(num_layers, device):
    """Host syncs of summarising the statistics of `num_layers` MoE layers (the criterion's
    logging of one forward)."""
    from .stats import summarize

    layers = [_layer("top2", device) for _ in range(num_layers)]
    x, mask = _padded_batch(device)
    stats = []
    for layer in layers:
        layer.train()
        layer(x, mask)
        stats.append(layer.aux.stats)
    counter = HostSyncCounter()
    with counter:
        summarize(stats)
    return counter


SCENARIOS = {
    "top2_train_fwd_bwd": lambda d: train_step_syncs(_layer("top2", d), *_padded_batch(d)),
    "top1_train_fwd_bwd": lambda d: train_step_syncs(_layer("top1", d), *_padded_batch(d)),
    "noisy_topk_train_fwd_bwd": lambda d: train_step_syncs(_layer("noisy_topk", d), *_padded_batch(d)),
    "top2_decoder_step": lambda d: decoder_step_syncs(_layer("top2", d)),
    "statistics_6_layers": lambda d: statistics_syncs(6, d),
}


def measure(device="cpu") -> dict:
    """{scenario: {"proxy": total, "by_op": {...}, "cuda_sync_debug": n or None}}"""
    device = torch.device(device)
    out = {}
    for name, run in SCENARIOS.items():
        torch.manual_seed(0)
        counter = run(device)
        row = {"proxy": counter.total, "by_op": dict(counter.counts), "cuda_sync_debug": None}
        if device.type == "cuda":
            torch.manual_seed(0)
            with cuda_sync_debug_count() as found:
                run(device)
            # run() makes two calls (a warm-up, then the counted one) where it has a warm-up
            row["cuda_sync_debug_all_calls"] = len(found)
        out[name] = row
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--json", help="also write the counts to this file")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU")
    result = measure(args.device)
    for name, row in result.items():
        extra = f"  cuda_sync_debug (warm-up + counted call) {row['cuda_sync_debug_all_calls']}" \
            if "cuda_sync_debug_all_calls" in row else ""
        print(f"{name:28s} {row['proxy']:3d}  {row['by_op']}{extra}")
    if args.json:
        from ..atomic_files import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
