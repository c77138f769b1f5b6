"""Expert parallelism: the experts of a MoE layer sharded over the ranks of a process group.

Sharding of E experts over W ranks (fairseq's rule: E must be a multiple or a divisor of W):

* W divides E: each rank holds L = E / W experts; global expert g lives on rank g // L as local
  expert g % L.
* E divides W (E < W): each expert is replicated R = W / E times, ranks [g*R, (g+1)*R) hold
  expert g (L = 1), and a token of source rank r routed to g goes to replica g*R + (r % R), so
  every replica serves the tokens of W / R = E source ranks.  The replicas see different
  tokens, so their gradients must be all-reduced over `replica_group()` after every backward
  (`all_reduce_expert_grads`), or they drift apart (fairseq issue #4220: its legacy_ddp skips
  every `expert` parameter, replicated or not).

`ExpertParallelComm` implements the communicator interface of `comm.LocalComm`: the layer
hands it the dispatched rows sorted by global expert with the count per global expert, and
gets back the rows its local experts must process, grouped by local expert.  One exchange is

1. the counts (`read_counts`): an int64 all-to-all of a (W, L + 1) matrix (how many rows this
   rank sends to each local expert of each rank, plus its `active` flag), then one host read of
   this rank's own counts and the received matrix together: the layer's one host sync;
2. the rows: one uneven all-to-all (no padding to a global maximum);
3. a permutation from (source rank, local expert) order to local-expert-major order, computed
   from the received count matrix with index arithmetic (no loop over tokens); skipped when
   L = 1.

`exchange_back` applies the inverse permutation and the reverse all-to-all.  Both all-to-alls
are differentiable (backward is the reverse exchange).  Gating-dropout steps never call the
communicator, so they issue no collective at all (`all_to_all_calls` counts every call).

The all-to-alls should run on a process group of their own (`all_to_all_group`), not on the
default group that data parallelism all-reduces gradients on: on NCCL each group has its own
communicator and stream, so the exchanges of one layer's backward do not queue behind (or
pair up with) a gradient bucket's all-reduce that another rank happened to issue first.

Generation with several ranks: each rank decodes its own batch, so ranks run different numbers
of decoder steps, while every MoE decoder call is a collective.  A rank that has finished sets
`active = False` and keeps serving the others' exchanges (generation_in_step.py) until every
rank's flag, which travels with the counts, says it is done; all ranks read the same flags
from the same exchange, so they leave in the same call.

Set-up in a model (every rank of `group` builds the same layers in the same order):

    comm = ExpertParallelComm(cfg.num_experts, all_to_all_group())  # after init_process_group
    layer = build_moe_layer(cfg, M, F, comm=comm)       # holds comm.num_local_experts experts
    ...
    loss.backward()
    ddp_all_reduce_non_expert_grads(model)              # e.g. fairseq legacy_ddp (skips `expert`)
    all_reduce_expert_grads(model, comm)                # replicas + fairseq's scale convention
"""
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from .all_to_all import A2AStats, all_to_all, exchange_counts
from .comm import HostCounts

def expert_sharding(num_experts: int, world_size: int) -> Tuple[int, int]:
    """(local experts per rank L, replicas per expert R) for E experts over W ranks."""
    if num_experts < 1 or world_size < 1:
        raise ValueError(f"--moe-expert-count ({num_experts}) and the world size ({world_size}) must be >= 1")
    if num_experts % world_size == 0:
        return num_experts // world_size, 1
    if world_size % num_experts == 0:
        return 1, world_size // num_experts
    raise ValueError(f"--moe-expert-count={num_experts} cannot be sharded over a world size of {world_size}: "
                     f"it must be a multiple or a divisor of {world_size}")


def expert_destination(expert: int, source_rank: int, num_experts: int, world_size: int) -> int:
    """The rank (in the expert-parallel group) that processes source_rank's tokens for `expert`."""
    num_local, replicas = expert_sharding(num_experts, world_size)
    if replicas == 1:
        return expert // num_local
    return expert * replicas + source_rank % replicas


def _exclusive_cumsum(x: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(x, 0) - x


@dataclass
class ExchangeHandle:
    input_splits: List[int]  # rows this rank sent to each rank
    output_splits: List[int]  # rows this rank received from each rank
    order: Optional[torch.Tensor]  # local-expert-major row i = received row order[i] (None: identity)
    inverse: Optional[torch.Tensor]
    local_in: torch.Tensor  # what exchange() returned (kept to keep the backward collective alive)


_REPLICA_GROUPS = {}
_A2A_GROUPS = {}


def _group_kwargs(timeout):
    return {} if timeout is None else {"timeout": timeout}


def all_to_all_group(timeout=None):
    """A process group of every rank, for the expert all-to-alls only (see the module
    docstring); created once per default group (and timeout) and shared by every layer.  Every rank must
    call this, in the same order relative to its other new_group calls (model construction
    does).  timeout: a datetime.timedelta (None: torch's default)."""
    key = (id(dist.distributed_c10d._get_default_group()), timeout)
    if key not in _A2A_GROUPS:
        _A2A_GROUPS[key] = dist.new_group(list(range(dist.get_world_size())), **_group_kwargs(timeout))
    return _A2A_GROUPS[key]


def _replica_group(group, num_experts: int, replicas: int, rank: int, timeout=None):
    """The process group of the ranks that hold the same expert as `rank` (cached: one set of
    groups per (process group, E), shared by every layer and communicator)."""
    ranks = dist.get_process_group_ranks(group if group is not None else dist.group.WORLD)
    key = (id(dist.distributed_c10d._get_default_group()), tuple(ranks), num_experts)
    if key not in _REPLICA_GROUPS:
        sets = [ranks[g * replicas:(g + 1) * replicas] for g in range(num_experts)]
        mine = rank // replicas
        if len(ranks) == dist.get_world_size():
            # Every rank of the job is here: create all groups in the same order everywhere.
            groups = [dist.new_group(s, **_group_kwargs(timeout)) for s in sets]
            _REPLICA_GROUPS[key] = groups[mine]
        else:
            # A sub-group (e.g. one expert-parallel group of several): only its members create it.
            _REPLICA_GROUPS[key] = dist.new_group(sets[mine], use_local_synchronization=True,
                                                  **_group_kwargs(timeout))
    return _REPLICA_GROUPS[key]


class ExpertParallelComm:
    """Communicator of an expert-parallel MoE layer (see the module docstring).

    num_experts: E, global experts of the layer.  group: the expert-parallel process group
    (None: the default group).  Attributes: world_size, rank (in `group`), num_experts,
    num_local_experts (L), num_replicas (R), stats (calls / bytes passed to all_to_all_single,
    forward and backward), all_to_all_calls.  One instance may serve every MoE layer of a model
    (the exchange state lives in the handle), in which case the counters add up over layers.
    """

    def __init__(self, num_experts: int, group=None, timeout=None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ExpertParallelComm needs torch.distributed to be initialised "
                               "(init_process_group) before the model is built")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.num_experts = num_experts
        self.num_local_experts, self.num_replicas = expert_sharding(num_experts, self.world_size)
        L, R = self.num_local_experts, self.num_replicas
        self.first_local_expert = self.rank * L if R == 1 else self.rank // R
        # Destination rank and local slot of each global expert for this source rank; experts
        # are sorted by id and destinations are non-decreasing in it, so each destination's
        # rows are one contiguous block of the dispatched tensor.
        self.destination = [expert_destination(g, self.rank, num_experts, self.world_size) for g in range(num_experts)]
        self._send_slot = {}  # device -> (E,) index into the flat (W, L + 1) send-count matrix
        self.stats = A2AStats()
        self._replica_group = _replica_group(group, num_experts, R, self.rank, timeout) if R > 1 else None
        # False while this rank, done generating, only serves the other ranks' decoder steps;
        # peers_active: whether any rank's flag was set in the last count exchange.
        self.active = True
        self.peers_active = True

    @property
    def all_to_all_calls(self) -> int:
        return self.stats.calls

    def local_expert_ids(self) -> List[int]:
        return list(range(self.first_local_expert, self.first_local_expert + self.num_local_experts))

    def replica_group(self):
        """Process group of the R ranks holding this rank's expert; None when R == 1."""
        return self._replica_group

    def remote_rows(self, counts: torch.Tensor) -> torch.Tensor:
        """Rows of this dispatch sent to other ranks (the rest stay on this rank)."""
        lo = self.first_local_expert
        return counts.sum() - counts[lo:lo + self.num_local_experts].sum()

    def _slots(self, device) -> torch.Tensor:
        if device not in self._send_slot:  # once per device (a host-to-device copy)
            L = self.num_local_experts
            self._send_slot[device] = torch.tensor([d * (L + 1) + g % L for g, d in enumerate(self.destination)],
                                                   dtype=torch.long, device=device)
        return self._send_slot[device]

    def read_counts(self, counts: torch.Tensor) -> HostCounts:
        """counts: (E,) rows this rank dispatches to each global expert, on the device.  Exchanges
        the counts (with the `active` flag) and reads this rank's and the received ones on the
        host in one transfer: the one host sync of a layer call."""
        W, L, E = self.world_size, self.num_local_experts, counts.numel()
        send = counts.new_zeros(W * (L + 1), dtype=torch.long).index_copy(0, self._slots(counts.device), counts.long())
        send.view(W, L + 1)[:, L].fill_(1 if self.active else 0)
        recv = exchange_counts(send, self.group, self.stats).view(W, L + 1)  # [s, l]: rows from s for l
        host = torch.cat([counts.long().to(recv.device), recv.reshape(-1)]).tolist()
        received = [host[E + s * (L + 1):E + (s + 1) * (L + 1)] for s in range(W)]
        self.peers_active = any(row[L] for row in received)
        return HostCounts(host[:E], [row[:L] for row in received], recv[:, :L])

    def exchange(self, x: torch.Tensor, counts: torch.Tensor, host: HostCounts):
        """x: (N, M) rows sorted by global expert, counts (E,) on the device, host what
        read_counts made of them.  Returns (rows for the local experts grouped by local expert,
        rows per local expert on the host, the same on the device, handle for exchange_back)."""
        W, L = self.world_size, self.num_local_experts
        input_splits = [0] * W
        for g, c in enumerate(host.sent):
            input_splits[self.destination[g]] += c
        recv_list, recv = host.received, host.received_t.to(x.device)
        output_splits = [sum(row) for row in recv_list]
        local_counts = [sum(recv_list[s][l] for s in range(W)) for l in range(L)]
        local_counts_t = recv.sum(0)
        rows = all_to_all(x, output_splits, input_splits, self.group, self.stats)
        order = inverse = None
        if L > 1 and W > 1:
            n = rows.shape[0]
            block_start = _exclusive_cumsum(recv.reshape(-1)).view(W, L)  # block (s, l) in received order
            target_counts = recv.t().reshape(-1)  # blocks in (l, s) order
            target_start = _exclusive_cumsum(target_counts)
            block = torch.repeat_interleave(torch.arange(W * L, device=recv.device), target_counts, output_size=n)
            order = (torch.arange(n, device=recv.device) - target_start[block] + block_start.t().reshape(-1)[block])
            order = order.to(x.device)
            inverse = torch.empty_like(order).index_copy_(0, order, torch.arange(n, device=order.device))
            rows = rows.index_select(0, order)
        return rows, local_counts, local_counts_t, ExchangeHandle(input_splits, output_splits, order, inverse, rows)

    def exchange_back(self, y: torch.Tensor, handle: ExchangeHandle) -> torch.Tensor:
        """y: expert outputs in the order exchange() returned; back to this rank's dispatch order."""
        if y.shape[0] == 0 and handle.local_in.requires_grad:
            # No rows arrived, so the experts did not read local_in and autograd would skip the
            # backward all-to-all of exchange() on this rank while the other ranks wait in it.
            y = y + 0 * handle.local_in.sum()
        if handle.inverse is not None:
            y = y.index_select(0, handle.inverse)
        return all_to_all(y, handle.input_splits, handle.output_splits, self.group, self.stats)


def all_reduce_expert_grads(module: torch.nn.Module, comm: ExpertParallelComm):
    """Reduce the gradients of the `expert = True` parameters of `module` after backward.

    Sums them over `comm.replica_group()` (a no-op when R == 1), then divides by W.  This
    matches fairseq's data-parallel convention: legacy_ddp (like c10d DDP) divides every shared
    gradient by W and sums it, i.e. it holds the mean over ranks of each rank's gradient of its
    own summed loss, (1/W) sum_r dL_r; the trainer then multiplies every gradient by
    W / sample_size to get the gradient of sum_r L_r / sample_size.  An expert's local gradient
    already sums over the tokens of every rank that routed to it (the all-to-all backward brings
    them), so (1/W) sum_r dL_r for an expert is (sum over its replicas) / W.  With this divisor
    expert and shared gradients get the same scale, so the trainer's rescaling, gradient
    clipping and the learning rate treat them alike.  (fairseq's MoE branch does the same with
    a hook dividing by W / R plus FSDP's mean over the R replicas,
    `--moe-normalize-expert-grad world_size`; Megatron and MegaBlocks also divide expert
    gradients by the expert-parallel size.  The mean over the replicas alone, a division by R,
    would leave them W / R times larger: E times when R > 1, W times when R == 1, as in
    fairseq's legacy_ddp MoE training, which leaves expert gradients unscaled.)

    Call it on every rank of the expert-parallel group, once per update (after the last
    accumulated backward).  A missing gradient counts as zero, so ranks whose experts got no
    tokens still join the collective.  Every expert parameter of `module` is assumed to be
    sharded like `comm` (all MoE layers of a model share E and the group).
    """
    divisor = comm.world_size
    params = [p for p in module.parameters() if getattr(p, "expert", False) and p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    group = comm.replica_group()
    if group is not None:
        buckets = {}
        for p in params:
            buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
        for grads in buckets.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=group)
            if divisor != 1:
                flat.div_(divisor)
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
    elif divisor != 1:
        for p in params:
            p.grad.div_(divisor)
