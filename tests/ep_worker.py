"""Worker processes of the expert-parallel tests: gloo on CPU in CI, NCCL on CUDA on a GPU machine.

Each process builds a single-process reference MoE layer (same seed everywhere, so identical on
every rank) and the expert-parallel layer whose local experts are copies of the reference's
slices.  Every rank feeds its own batch; the reference processes that batch alone (routing is
per rank anyway), and the comparisons are made inside the workers: an assertion error in any
rank fails the spawning test with the traceback.

The device follows the backend (`device_for`): with nccl, rank r works on cuda:LOCAL_RANK (NCCL
moves CUDA tensors only); with gloo, on the CPU.  Layers, batches and every tensor a collective
sees are put there, so one set of scenarios checks both.  On CUDA, TF32 is switched off (the
1e-5 tolerance is a float32 one) and the checkpointing scenario's gradients are compared within
that tolerance instead of bit for bit (CUDA's index_add / scatter_add accumulate with atomics, in
no fixed order).

Started three ways:
- by the tests: torch.multiprocessing with `run(rank, world_size, port, jobs)` (gloo);
- as a program, spawning its own processes (scripts/gpu_check.sh, step 3):
      python tests/ep_worker.py --backend nccl --nprocs 2
- under torchrun, one process per GPU (RANK / WORLD_SIZE / LOCAL_RANK from the environment):
      torchrun --nproc_per_node 2 tests/ep_worker.py --backend nccl
Either program form runs `suite(world_size)`: the W = 2 and W = 4 scenarios of
tests/test_expert_parallel.py and tests/test_activation_checkpointing.py, sized for any W.
"""
import argparse
import datetime
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from moe_fairseq.moe import MoEConfig, build_moe_layer  # noqa: E402
from moe_fairseq.moe.expert_parallel import ExpertParallelComm, all_reduce_expert_grads  # noqa: E402

TOL = dict(atol=1e-5, rtol=1e-5)
M, F = 16, 24
EXPERT_PARAMS = ("w1", "b1", "w2", "b2")
BACKENDS = ("gloo", "nccl")
DEVICE = torch.device("cpu")  # this process's device, set by setup_device (run / main)
# How long a rank waits in one collective for its peers before it fails (torch's default is 30 min
# for gloo): a rank that dies or hangs then fails the test in minutes instead of blocking CI.
TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("MOE_EP_WORKER_TIMEOUT", "300")))


def device_for(backend: str, local_rank: int, cuda_devices: int) -> torch.device:
    """The device a rank works on: cuda:local_rank for nccl, the CPU for gloo."""
    if backend not in BACKENDS:
        raise ValueError(f"--backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
    if backend == "gloo":
        return torch.device("cpu")
    if local_rank >= cuda_devices:
        raise ValueError(f"--backend nccl: local rank {local_rank} needs a GPU of its own, but torch sees "
                         f"{cuda_devices} (one process per GPU)")
    return torch.device("cuda", local_rank)


def setup_device(backend: str, local_rank: int) -> torch.device:
    global DEVICE
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    DEVICE = device_for(backend, local_rank, cuda_devices)
    if DEVICE.type == "cuda":
        torch.cuda.set_device(DEVICE)  # NCCL and all_gather_object use the current device
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return DEVICE


def run(rank, world_size, port, jobs, backend="gloo", local_rank=None):
    """Entry point for torch.multiprocessing: run [(scenario, kwargs), ...] in order."""
    torch.set_num_threads(1)
    setup_device(backend, rank if local_rank is None else local_rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=TIMEOUT)
    run_jobs(rank, world_size, jobs)


def run_and_exit(rank, world_size, port, jobs, backend="gloo"):
    """`run` for a spawned rank, which then leaves without finalizing the interpreter.  A spawned
    child (unlike a forked one, which multiprocessing ends with os._exit) exits through Python's
    finalization, where gloo's C++ threads can still hold objects that need the GIL.  Under load,
    fresh-clone CI runs have seen rank 1 of the spawned suite abort ("terminate called without an
    active exception", SIGABRT) with no scenario reporting a failure, barrier below or not;
    PyTorch describes a similar abort at interpreter teardown (pytorch/pytorch#179291).  Only a
    rank that passed leaves this way: a failure raises, for torch.multiprocessing to report."""
    run(rank, world_size, port, jobs, backend)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_jobs(rank, world_size, jobs):
    """Run [(scenario, kwargs), ...] in order in an initialised process group, then tear it down."""
    try:
        for name, kwargs in jobs:
            try:
                SCENARIOS[name](rank, world_size, **kwargs)
            except Exception as exc:
                raise AssertionError(f"rank {rank}, scenario {name} {kwargs}: {exc}") from exc
        # Every rank finishes before any tears down: rank 0 hosts the TCP store, and a rank still
        # talking to it when rank 0's process exits can abort.  Once in a fresh-clone CI run
        # (2026-11-28) rank 1 died with "terminate called without an active exception"
        # (SIGABRT); this race is the likeliest cause, and the barrier rules it out.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def close(a, b, what):
    if not torch.allclose(a, b, **TOL):
        diff = (a - b).abs().max().item() if a.shape == b.shape else f"shapes {tuple(a.shape)} vs {tuple(b.shape)}"
        raise AssertionError(f"{what} differs from the reference (max abs diff {diff})")


def grad(p):
    return p.grad if p.grad is not None else torch.zeros_like(p)


def build_pair(cfg, comm, orthogonal_router=False):
    torch.manual_seed(cfg.seed)  # built on the CPU, then moved: the same weights on every device
    ref = build_moe_layer(cfg, M, F)
    ep = build_moe_layer(cfg, M, F, comm=comm)
    if orthogonal_router:  # rows of the router are orthonormal: x = 20 q_e routes to expert e
        q, _ = torch.linalg.qr(torch.randn(M, M))
        with torch.no_grad():
            ref.router.wg.weight.copy_(q[:cfg.num_experts])
    ep.router.load_state_dict(ref.router.state_dict())
    ids = comm.local_expert_ids()
    with torch.no_grad():
        for name in EXPERT_PARAMS:
            getattr(ep.experts, name).copy_(getattr(ref.experts, name)[ids])
    return ref.to(DEVICE), ep.to(DEVICE)


def batch(rank, num_tokens, seed, local_only=None, router=None):
    g = torch.Generator().manual_seed(1000 * seed + rank)  # CPU generator: the same batch on any device
    x = torch.randn(num_tokens, M, generator=g)
    if local_only is not None:  # every token's top choices are among `local_only` (router rows)
        q = router.wg.weight.detach()[local_only].cpu()
        x = 0.1 * x + 20 * q.sum(0) if len(local_only) > 1 else 0.1 * x + 20 * q[0]
        pick = torch.randint(len(local_only), (num_tokens,), generator=g)
        if len(local_only) > 1:  # vary which local expert wins the first slot
            x = x + 2 * q[pick]
    target = torch.randn(num_tokens, M, generator=g)
    return x.to(DEVICE), target.to(DEVICE)


def step(layer, x, target, rank, seed):
    x = x.clone().requires_grad_(True)
    torch.manual_seed(7 * seed + rank)  # same Gumbel / sampling noise in both layers
    out = layer(x)
    loss = (out * target).sum() + sum(layer.aux.losses.values())
    loss.backward()
    return out.detach(), x.grad, layer.aux


def equivalence(rank, world, num_experts, router="top2", tokens=None, capacity_factor=None, dropless=False,
                second_expert_policy="sampling", local_only_rank=None, expect_drops=False, seed=1):
    """EP layer == reference: outputs, input grads, router grads per rank; expert grads summed
    over ranks; replica all-reduce for E < W."""
    cfg = MoEConfig(num_experts=num_experts, router=router, capacity_factor=capacity_factor, dropless=dropless,
                    second_expert_policy=second_expert_policy, seed=seed)
    comm = ExpertParallelComm(num_experts)
    ref, ep = build_pair(cfg, comm, orthogonal_router=local_only_rank is not None)
    ref.train(), ep.train()
    num_tokens = tokens[rank] if tokens else 32
    local_only = None
    if rank == local_only_rank:
        local_only = comm.local_expert_ids() if router == "top2" and comm.num_local_experts > 1 else \
            comm.local_expert_ids()[:1]
        if router == "top2" and len(local_only) < 2:
            raise ValueError("a top2 local-only rank needs L >= 2")
    x, target = batch(rank, num_tokens, seed, local_only, ref.router)

    out_ref, gx_ref, aux_ref = step(ref, x, target, rank, seed)
    calls = comm.all_to_all_calls
    out_ep, gx_ep, aux_ep = step(ep, x, target, rank, seed)
    assert comm.all_to_all_calls - calls == 5, f"{comm.all_to_all_calls - calls} all-to-alls (3 forward + 2 backward)"

    close(out_ep, out_ref, "output")
    close(gx_ep, gx_ref, "input gradient")
    close(grad(ep.router.wg.weight), grad(ref.router.wg.weight), "router gradient")
    assert torch.equal(aux_ep.stats.tokens_per_expert, aux_ref.stats.tokens_per_expert)
    for k in aux_ref.losses:
        close(aux_ep.losses[k].detach(), aux_ref.losses[k].detach(), f"loss {k}")
    if expect_drops:
        drops = torch.tensor([float(aux_ep.stats.dropped_by_capacity)], device=DEVICE)
        dist.all_reduce(drops)
        assert drops.item() > 0, "the capacity scenario dropped nothing"
    if local_only is not None:
        assert float(aux_ep.stats.a2a_bytes) == 0, "the local-only rank sent rows to another rank"
        assert num_tokens > 0 and float(comm.remote_rows(aux_ep.stats.tokens_per_expert)) == 0

    # Expert gradients: the reference's summed over every rank's batch.
    ids = comm.local_expert_ids()
    ref_sum = {}
    for name in EXPERT_PARAMS:
        g = grad(getattr(ref.experts, name)).clone()
        dist.all_reduce(g)
        ref_sum[name] = g[ids]
    raw = {name: grad(getattr(ep.experts, name)).clone() for name in EXPERT_PARAMS}
    if comm.num_replicas == 1:
        for name in EXPERT_PARAMS:
            close(raw[name], ref_sum[name], f"expert gradient {name}")
    else:
        # Each replica saw only the tokens of the ranks r with r % R == its index.
        for name in EXPERT_PARAMS:
            assert not torch.allclose(raw[name], ref_sum[name], **TOL), "a replica already holds the full gradient"
    # After the reduction: the sum over the replicas, divided by W (fairseq's scale).
    all_reduce_expert_grads(ep, comm)
    for name in EXPERT_PARAMS:
        close(getattr(ep.experts, name).grad, ref_sum[name] / world, f"expert gradient {name}")
    # The router is not an expert parameter: all_reduce_expert_grads leaves it alone.
    close(grad(ep.router.wg.weight), grad(ref.router.wg.weight), "router gradient after all_reduce_expert_grads")


def exchange_layout(rank, world, num_experts, seed=3):
    """exchange() returns rows grouped by local expert, source-rank-major inside a group, each
    from the right source; a replica receives only from sources r with r % R == its index;
    exchange_back() is the exact inverse."""
    comm = ExpertParallelComm(num_experts)
    g = torch.Generator().manual_seed(seed * 100 + rank)
    n = int(torch.randint(0, 30, (1,), generator=g))
    expert = torch.sort(torch.randint(num_experts, (n,), generator=g)).values
    counts = torch.bincount(expert, minlength=num_experts)
    # Row = (source rank, global expert, position): identifies itself after the exchange.
    x = torch.stack([torch.full((n,), float(rank)), expert.float(), torch.arange(n).float()], 1).to(DEVICE)
    counts = counts.to(DEVICE)
    local, local_counts, local_counts_t, handle = comm.exchange(x, counts, comm.read_counts(counts))
    assert sum(local_counts) == local.shape[0]
    assert local_counts_t.tolist() == local_counts
    ids = comm.local_expert_ids()
    start = 0
    for l, c in enumerate(local_counts):
        block = local[start:start + c]
        start += c
        assert torch.all(block[:, 1] == ids[l]), "a row landed in the wrong local expert group"
        assert torch.all(block[1:, 0] >= block[:-1, 0]), "rows of a group are not ordered by source rank"
        if comm.num_replicas > 1:
            assert torch.all(block[:, 0].long() % comm.num_replicas == rank % comm.num_replicas), "unbalanced replica"
    back = comm.exchange_back(local, handle)
    assert torch.equal(back, x), "exchange_back is not the inverse of exchange"
    # The counts every rank sent add up to what the local experts received.
    all_counts = [None] * world
    dist.all_gather_object(all_counts, counts.tolist())
    if comm.num_replicas == 1:
        expected = [sum(c[e] for c in all_counts) for e in ids]
    else:
        expected = [sum(c[ids[0]] for s, c in enumerate(all_counts) if s % comm.num_replicas == rank % comm.num_replicas)]
    assert local_counts == expected, (local_counts, expected)


def gating_dropout(rank, world, num_experts, mode="gate_drop", p=0.3, updates=200, run_updates=12):
    cfg = MoEConfig(num_experts=num_experts, router="top2", gating_dropout=p, gating_dropout_mode=mode, seed=11)
    comm = ExpertParallelComm(num_experts)
    torch.manual_seed(0)
    layer = build_moe_layer(cfg, M, F, layer_index=2, comm=comm).to(DEVICE).train()
    decisions = []
    for u in range(updates):
        layer.set_num_updates(u)
        decisions.append(layer.gating_dropped())
    gathered = [None] * world
    dist.all_gather_object(gathered, decisions)
    assert all(d == decisions for d in gathered), "ranks took different gating-dropout decisions"
    frac = sum(decisions) / updates
    assert abs(frac - p) < 0.12, f"drop fraction {frac} far from p={p}"
    assert any(decisions[:run_updates]) and not all(decisions[:run_updates])
    x0 = torch.randn(8 + 3 * rank, M).to(DEVICE)
    for u in range(run_updates):
        layer.set_num_updates(u)
        x = x0.clone().requires_grad_(True)
        calls, sent = comm.all_to_all_calls, comm.stats.bytes_sent
        out = x + layer(x)
        (out * out).sum().backward()
        issued = comm.all_to_all_calls - calls
        if decisions[u]:
            assert issued == 0 and comm.stats.bytes_sent == sent, f"dropped update {u} issued {issued} all-to-alls"
            assert float(layer.aux.stats.gating_dropped) == 1 and float(layer.aux.stats.a2a_bytes) == 0
            if mode == "gate_expert_drop":
                assert torch.equal(out.detach(), x0)
        else:
            assert issued == 5, f"routed update {u} issued {issued} all-to-alls"
        all_reduce_expert_grads(layer, comm)  # a collective after every update: ranks stay in step
        layer.zero_grad()


def local_topk(rank, world, num_experts, router="top2", capacity_factor=None, dropless=False, p=0.5, seed=5,
               tokens=None, expect_drops=False, updates=8):
    """Gating Dropout's local_topk: a dropped update issues no all-to-all and equals, on each rank,
    a routed update of a one-process layer of L experts made of this rank's router rows and
    experts (outputs, input / router / expert gradients, losses, load, same noise); the other
    ranks' router rows get zero gradient.  A routed update issues the usual 5 all-to-alls."""
    cfg = MoEConfig(num_experts=num_experts, router=router, capacity_factor=capacity_factor, dropless=dropless,
                    gating_dropout=p, gating_dropout_mode="local_topk", seed=seed)
    comm = ExpertParallelComm(num_experts)
    L, first = comm.num_local_experts, comm.local_expert_ids()[0]
    torch.manual_seed(seed)
    ep = build_moe_layer(cfg, M, F, layer_index=1, comm=comm).train()
    cfg_local = MoEConfig(num_experts=L, router=router, capacity_factor=capacity_factor, dropless=dropless, seed=seed)
    ref = build_moe_layer(cfg_local, M, F).train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in ep.router.parameters():  # noisy_topk starts at zero: a router that routes
            t.normal_(0, 1, generator=g)
    ref.router.load_state_dict({k: v[first:first + L] for k, v in ep.router.state_dict().items()})
    ref.experts.load_state_dict(ep.experts.state_dict())
    ep, ref = ep.to(DEVICE), ref.to(DEVICE)
    x, target = batch(rank, tokens[rank] if tokens else 24, seed)
    kinds, drops = [], 0
    for u in range(updates):
        ep.set_num_updates(u)
        calls = comm.all_to_all_calls
        out_ep, gx_ep, aux_ep = step(ep, x, target, rank, seed + u)
        issued = comm.all_to_all_calls - calls
        dropped = ep.gating_dropped()
        kinds.append(dropped)
        if not dropped:
            assert issued == 5, f"routed update {u} issued {issued} all-to-alls"
            all_reduce_expert_grads(ep, comm)
        else:
            assert issued == 0, f"dropped update {u} issued {issued} all-to-alls"
            out_ref, gx_ref, aux_ref = step(ref, x, target, rank, seed + u)
            close(out_ep, out_ref, f"output (update {u})")
            close(gx_ep, gx_ref, "input gradient")
            for name, t in ep.router.named_parameters():
                g = grad(t)
                close(g[first:first + L], grad(dict(ref.router.named_parameters())[name]), f"router gradient {name}")
                assert torch.count_nonzero(g) == torch.count_nonzero(g[first:first + L]), "other ranks' rows moved"
            for name in EXPERT_PARAMS:
                close(grad(getattr(ep.experts, name)), grad(getattr(ref.experts, name)), f"expert gradient {name}")
            assert aux_ep.losses.keys() == aux_ref.losses.keys() and aux_ep.losses
            for k in aux_ref.losses:
                close(aux_ep.losses[k].detach(), aux_ref.losses[k].detach(), f"loss {k}")
            st = aux_ep.stats
            assert float(st.gating_dropped) == 1 and float(st.a2a_bytes) == 0
            load = st.tokens_per_expert
            assert torch.equal(load[first:first + L], aux_ref.stats.tokens_per_expert) and int(load.sum()) == int(
                aux_ref.stats.tokens_per_expert.sum()), "load off this rank's experts"
            drops += int(st.dropped_by_capacity)
            ref.zero_grad()
        ep.zero_grad()
    assert any(kinds) and not all(kinds), kinds
    if expect_drops:
        total = torch.tensor([float(drops)], device=DEVICE)
        dist.all_reduce(total)
        assert total.item() > 0, "the capacity scenario dropped nothing on a dropped update"
    # k larger than a rank's experts: refused when the layer is built, in one line naming the flags
    try:
        build_moe_layer(MoEConfig(num_experts=world, router="top2", gating_dropout=p, gating_dropout_mode="local_topk"),
                        M, F, comm=ExpertParallelComm(world))
    except ValueError as exc:
        assert str(exc) == (f"--moe-gating-dropout-mode local_topk routes each token to k=2 (--moe-router top2) of its "
                            f"rank's experts, but --moe-expert-count={world} over {world} rank(s) leaves 1 per rank; "
                            f"use gate_drop or more experts"), str(exc)
    else:
        raise AssertionError("top2 with one expert per rank was not refused")


def bad_sharding(rank, world, num_experts):
    try:
        ExpertParallelComm(num_experts)
    except ValueError as exc:
        expected = (f"--moe-expert-count={num_experts} cannot be sharded over a world size of {world}: "
                    f"it must be a multiple or a divisor of {world}")
        assert str(exc) == expected, str(exc)
    else:
        raise AssertionError("no ValueError")


def checkpointing(rank, world, num_experts, dropout=0.0):
    """An expert-parallel MoE transformer encoder layer with --checkpoint-activations against the
    same layer without: equal gradients (exactly: the recomputation replays the same RNG draws),
    aux losses counted once, and the recomputation repeats exactly the forward's all-to-alls, the
    same number on every rank (uneven token counts, so the ranks' backward needs differ)."""
    from fairseq.models.transformer import TransformerConfig

    from moe_fairseq.models.moe_transformer_layers import MoETransformerEncoderLayer
    from moe_fairseq.moe.collect import pop_aux

    results = {}
    for checkpointed in (False, True):
        torch.manual_seed(0)
        cfg = TransformerConfig()
        cfg.encoder.embed_dim, cfg.encoder.ffn_embed_dim, cfg.encoder.attention_heads = M, F, 2
        cfg.dropout = cfg.attention_dropout = dropout
        cfg.checkpoint_activations = checkpointed
        comm = ExpertParallelComm(num_experts)
        moe = build_moe_layer(MoEConfig(num_experts=num_experts, router="top2", expert_dropout=dropout, jitter_eps=0.1),
                              M, F, comm=comm)
        layer = MoETransformerEncoderLayer(cfg, moe).to(DEVICE).train()
        g = torch.Generator().manual_seed(10 + rank)
        tokens = 5 + 3 * rank
        x = torch.randn(tokens, 3, M, generator=g).to(DEVICE).requires_grad_(True)
        mask = torch.zeros(3, tokens, dtype=torch.bool, device=DEVICE)
        mask[0, -2:] = True
        target = torch.randn(tokens, 3, M, generator=g).to(DEVICE)
        torch.manual_seed(7 + rank)
        out = layer(x, mask)
        losses, _ = pop_aux(layer)
        forward_calls = comm.all_to_all_calls
        ((out * target).sum() + sum(v for d in losses for v in d.values())).backward()
        grads = {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters() if p.grad is not None}}
        results[checkpointed] = grads, forward_calls, comm.all_to_all_calls, moe.aux
    (plain, plain_fwd, plain_all, _), (ckpt, ckpt_fwd, ckpt_all, left) = results[False], results[True]
    assert plain.keys() == ckpt.keys()
    for name in plain:
        # exact on the CPU; CUDA's atomic index_add / scatter_add sum in no fixed order
        same = torch.equal(plain[name], ckpt[name]) if DEVICE.type == "cpu" else \
            torch.allclose(plain[name], ckpt[name], **TOL)
        if not same:
            raise AssertionError(f"grad of {name} differs with checkpointing")
    assert plain_fwd == ckpt_fwd > 0 and ckpt_all == plain_all + ckpt_fwd, (plain_fwd, ckpt_fwd, plain_all, ckpt_all)
    calls = [torch.zeros(1, dtype=torch.long, device=DEVICE) for _ in range(world)]
    dist.all_gather(calls, torch.tensor([ckpt_all], device=DEVICE))
    assert len({int(c) for c in calls}) == 1, f"all-to-alls per rank differ: {calls}"
    assert not left.losses and left.stats is None  # the recomputation's aux was discarded


def host_syncs(rank, world, num_experts, train_budget=2, decode_budget=1):
    """An expert-parallel top-2 layer (capacity 1.0, padding present) syncs with the host at most
    `train_budget` times per forward + backward and `decode_budget` times per decoder step
    (moe_fairseq/moe/host_syncs.py counts what would sync on CUDA)."""
    from moe_fairseq.moe.expert_parallel import all_to_all_group
    from moe_fairseq.moe.host_syncs import HostSyncCounter

    cfg = MoEConfig(num_experts=num_experts, router="top2", capacity_factor=1.0)
    layer = build_moe_layer(cfg, M, F, comm=ExpertParallelComm(num_experts, all_to_all_group())).to(DEVICE)
    x = torch.randn(9, 3, M, generator=torch.Generator().manual_seed(rank)).to(DEVICE).requires_grad_()
    mask = torch.zeros(9, 3, dtype=torch.bool)
    mask[-2 - rank:, 0] = True
    mask = mask.to(DEVICE)
    for counting in (False, True):  # the first call fills the communicator's per-device cache
        counter = HostSyncCounter()
        with counter if counting else torch.no_grad():
            out = layer(x, mask)
            if counting:
                (out.pow(2).sum() + sum(layer.aux.losses.values())).backward()
    assert counter.total <= train_budget, f"training: {counter.total} host syncs {dict(counter.counts)}"
    layer.eval()
    with torch.no_grad():
        step = torch.randn(1, 5, M).to(DEVICE)
        counter = HostSyncCounter()
        with counter:
            layer(step)
    assert counter.total <= decode_budget, f"decoder step: {counter.total} host syncs {dict(counter.counts)}"


def own_group(rank, world, num_experts):
    """The all-to-alls run on a group of their own: a rank that issues a data-parallel
    all-reduce (asynchronously, as DDP's gradient buckets do) before its MoE layer's exchanges,
    while the other rank issues it after them, does not deadlock or pair the wrong collectives."""
    from moe_fairseq.moe.expert_parallel import all_to_all_group

    group = all_to_all_group()
    assert group is not dist.group.WORLD and group is all_to_all_group(), "one dedicated group, cached"
    cfg = MoEConfig(num_experts=num_experts, router="top2", capacity_factor=None)
    layer = build_moe_layer(cfg, M, F, comm=ExpertParallelComm(num_experts, group)).to(DEVICE)
    x = torch.randn(6, M, generator=torch.Generator().manual_seed(rank)).to(DEVICE)
    bucket = torch.full((4,), float(rank + 1), device=DEVICE)
    if rank == 0:
        work = dist.all_reduce(bucket, async_op=True)
        out = layer(x)
        work.wait()
    else:
        out = layer(x)
        dist.all_reduce(bucket)
    assert torch.all(bucket == sum(range(1, world + 1))), "the all-reduce paired with another collective"
    assert out.shape == x.shape


def generation_in_step(rank, world, num_experts, steps=(5, 2)):
    """Ranks decoding different numbers of steps through two expert-parallel MoE layers stay in
    step (moe/generation_in_step.py), and each rank's outputs equal the single-process layers'."""
    from moe_fairseq.moe.expert_parallel import all_to_all_group
    from moe_fairseq.moe.generation_in_step import generate_in_step

    group = all_to_all_group()
    pairs = [build_pair(MoEConfig(num_experts=num_experts, router="top2", seed=s), ExpertParallelComm(num_experts, group))
             for s in (1, 2)]
    for ref, ep in pairs:
        ref.eval()
        ep.eval()
    g = torch.Generator().manual_seed(rank)
    inputs = [torch.randn(3, M, generator=g).to(DEVICE) for _ in range(steps[rank % len(steps)])]

    def decode():
        outs = []
        for x in inputs:  # one decoder step: every MoE layer once, in order
            for _, ep in pairs:
                x = ep(x)
            outs.append(x)
        return outs

    with torch.no_grad():
        outs = generate_in_step(decode, [ep for _, ep in pairs])
        for x, out in zip(inputs, outs):
            for ref, _ in pairs:
                x = ref(x)
            close(out, x, "a decoder step's output")
    assert all(ep.comm.active for _, ep in pairs), "the flag is set back after generation"


def group_timeouts(rank, world, seconds=7):
    """The all-to-all group and the replica groups wait --collective-timeout, not torch's
    default (1 expert over W ranks: every rank holds a replica)."""
    import datetime

    from moe_fairseq.moe.expert_parallel import all_to_all_group

    timeout = datetime.timedelta(seconds=seconds)
    comm = ExpertParallelComm(1, all_to_all_group(timeout), timeout)
    assert comm.num_replicas == world
    for what, group in (("all-to-all", comm.group), ("replica", comm.replica_group())):
        got = group._get_backend(DEVICE).options._timeout
        assert got == timeout, f"the {what} group waits {got}, not {timeout}"


def peer_timeout(rank, world, hold):
    """Rank 0 waits in a barrier the other ranks never reach (they sleep `hold` seconds): the
    process group's timeout (TIMEOUT) must end rank 0's wait with an error."""
    if rank == 0:
        dist.barrier()
    else:
        time.sleep(hold)


SCENARIOS = {"equivalence": equivalence, "exchange_layout": exchange_layout, "gating_dropout": gating_dropout,
             "local_topk": local_topk,
             "bad_sharding": bad_sharding, "checkpointing": checkpointing, "host_syncs": host_syncs,
             "own_group": own_group, "generation_in_step": generation_in_step, "group_timeouts": group_timeouts,
             "peer_timeout": peer_timeout}


def suite(world: int, quick: bool = False) -> list:
    """The scenarios a GPU check runs on `world` ranks: two local experts per rank, one per rank,
    replicated experts (when W is even), uneven and empty batches, a rank whose tokens all stay
    local, capacity drops, Gating Dropout in its three modes, activation checkpointing, the host-sync
    budget, the all-to-alls' own group and its timeout, and ranks generating different lengths."""
    if world < 2:
        raise ValueError(f"expert parallelism needs 2 or more processes (got {world})")
    uneven = [(7 * r + 5) % 37 for r in range(world)]
    uneven[-1] = 0  # a rank without tokens still joins every collective
    jobs = [("exchange_layout", dict(num_experts=2 * world)),
            ("equivalence", dict(num_experts=2 * world, router="top2")),
            ("equivalence", dict(num_experts=2 * world, router="top1", capacity_factor=0.5, expect_drops=True)),
            ("checkpointing", dict(num_experts=2 * world, dropout=0.1))]
    if quick:
        return jobs
    jobs += [("equivalence", dict(num_experts=2 * world, router="top2", dropless=True, tokens=uneven, seed=2)),
             ("equivalence", dict(num_experts=2 * world, router="top2", tokens=[23] + [31] * (world - 1),
                                  local_only_rank=0)),
             ("equivalence", dict(num_experts=2 * world, router="top2", capacity_factor=0.75, expect_drops=True,
                                  seed=3)),
             ("exchange_layout", dict(num_experts=world)),
             ("equivalence", dict(num_experts=world, router="top1", capacity_factor=0.5, expect_drops=True)),
             ("gating_dropout", dict(num_experts=2 * world, mode="gate_drop")),
             ("gating_dropout", dict(num_experts=2 * world, mode="gate_expert_drop", p=0.5)),
             ("gating_dropout", dict(num_experts=2 * world, mode="local_topk", p=0.5)),
             ("local_topk", dict(num_experts=2 * world, router="top2", dropless=True, tokens=uneven)),
             ("local_topk", dict(num_experts=2 * world, router="top1", capacity_factor=0.5, expect_drops=True)),
             ("checkpointing", dict(num_experts=2 * world, dropout=0.0)),
             ("host_syncs", dict(num_experts=2 * world)), ("own_group", dict(num_experts=2 * world)),
             ("generation_in_step", dict(num_experts=2 * world, steps=tuple(range(world, 0, -1)))),
             ("group_timeouts", {})]
    if world % 2 == 0:  # two replicas of every expert (one expert at W = 2: top1)
        jobs += [("exchange_layout", dict(num_experts=world // 2)),
                 ("equivalence", dict(num_experts=world // 2, router="top2" if world >= 4 else "top1", dropless=True))]
    return jobs


def _torchrun_main(backend, quick):
    """One rank under torchrun: RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT from the environment."""
    rank, world, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    torch.set_num_threads(1)
    setup_device(backend, local_rank)
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=TIMEOUT)
    jobs = suite(world, quick)
    run_jobs(rank, world, jobs)
    if rank == 0:
        print(f"expert parallelism on {backend}: {len(jobs)} scenarios passed on {world} ranks "
              f"({DEVICE.type})", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description="expert-parallel equivalence against the single-process MoE layer")
    p.add_argument("--backend", choices=BACKENDS, default="gloo", help="nccl: one CUDA device per rank; gloo: CPU")
    p.add_argument("--nprocs", type=int, default=2, help="processes to spawn (ignored under torchrun)")
    p.add_argument("--quick", action="store_true", help="the four basic scenarios only")
    args = p.parse_args(argv)
    if "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return _torchrun_main(args.backend, args.quick)
    jobs = suite(args.nprocs, args.quick)
    if args.backend == "nccl":  # before spawning, so a missing GPU is one line, not W tracebacks
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        device_for("nccl", args.nprocs - 1, n)
    import torch.multiprocessing as mp

    from cli_helpers import free_port

    # spawn: a CUDA context cannot be forked
    mp.start_processes(run_and_exit, args=(args.nprocs, free_port(), jobs, args.backend), nprocs=args.nprocs, join=True,
                       start_method="spawn")
    print(f"expert parallelism on {args.backend}: {len(jobs)} scenarios passed on {args.nprocs} ranks "
          f"({'cuda' if args.backend == 'nccl' else 'cpu'})", flush=True)


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:
        sys.exit(f"ep_worker: error: {e}")
