"""The MoE feed-forward layer: route -> plan -> dispatch -> (all-to-all) -> experts -> back -> combine."""
import contextlib
import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn as nn

from . import decode
from .aux_mode import AuxMode, default_aux_mode
from .comm import LocalComm, host_counts
from .dispatch import combine, dispatch, plan_dispatch
from .experts import FFNExperts, compute_dtype
from .gating_dropout import MODES as GATING_DROPOUT_MODES
from .gating_dropout import check_local_topk, gating_dropout_fires
from .routers import ROUTERS, Router
from .stats import RoutingStats, entropy_sum
from .errors import MoEUsageError


@dataclass
class MoEAux:
    """What one forward of a MoE layer leaves for the loss and the logs."""

    losses: Dict[str, torch.Tensor] = field(default_factory=dict)  # weighted, differentiable
    stats: Optional[RoutingStats] = None


class MoELayer(nn.Module):
    """A drop-in replacement for a transformer FFN sub-layer, usable without fairseq.

    forward(x, padding_mask, aux_mode) takes x of shape (..., M) and an optional bool mask of
    shape (...) that is True at padding; padding rows are never routed, never counted in a
    balance loss or statistic, and get a zero output.  aux_mode (AuxMode) says what the call
    computes besides the output; its losses and statistics are left in `self.aux`.

    Gating Dropout (training only): with probability `gating_dropout` a whole step of this
    layer routes without the all-to-all, decided from (seed, update number, layer index) so
    every rank agrees without communicating.  `gate_drop`: token s of this rank goes to local expert
    s mod L (L experts on this rank: a balanced round-robin, no router, so no all-to-all), and
    its output is not scaled by a gate.  `gate_expert_drop`: the layer returns zeros, so the
    residual connection alone carries the token.  `local_topk`: the router chooses among this
    rank's experts only (Router.restricted_to), so nothing leaves the rank; the exact rule, its
    losses and statistics are in moe/gating_dropout.py.
    """

    def __init__(self, router: Router, experts: FFNExperts, layer_index: int = 0, comm=None,
                 gating_dropout: float = 0.0, gating_dropout_mode: str = "gate_drop", seed: int = 1):
        super().__init__()
        self.router = router
        self.experts = experts
        self.comm = comm if comm is not None else LocalComm(router.num_experts)
        # The arguments' own rules; a layer built from a MoEConfig has passed the flags' rules.
        if experts.num_local != self.comm.num_local_experts:
            raise ValueError(f"MoELayer: experts hold {experts.num_local} experts but comm expects "
                             f"{self.comm.num_local_experts} local experts")
        self.layer_index = layer_index
        if not 0 <= gating_dropout < 1:
            raise ValueError(f"MoELayer: gating_dropout must be in [0, 1) (got {gating_dropout})")
        self.gating_dropout = gating_dropout
        if gating_dropout_mode not in GATING_DROPOUT_MODES:
            raise ValueError(f"MoELayer: gating_dropout_mode must be one of {', '.join(GATING_DROPOUT_MODES)} "
                             f"(got {gating_dropout_mode!r})")
        if gating_dropout_mode == "local_topk":
            check_local_topk(router, experts.num_local)
        self.gating_dropout_mode = gating_dropout_mode
        self.seed = seed
        self.num_updates = 0
        # The mode of a call that names none: fairseq's layers call this one with (x, mask) only,
        # so a caller reaching it through them sets this (collect.computing_aux: the criterion
        # for validation, moe-prune's usage count).  None: default_aux_mode(self.training).
        self.aux_mode: Optional[AuxMode] = None
        # Decoder steps on CPU (a few rows, no autograd) take moe/decode.py's path; False sends
        # every call through the general dispatch (benchmarks compare the two).  It changes how,
        # not what: both compute the same output.
        self.decode_fast_path = True
        # The losses and statistics of the last call.  An attribute, not a return value, because
        # fairseq's transformer layer calls this module as its fc1 and takes one tensor back;
        # forward is its one writer, collect.pop_aux its reader, and `recomputing` is how
        # activation checkpointing keeps it through a recomputation.
        self.aux = MoEAux()

    def set_num_updates(self, num_updates: int):
        # fairseq calls this on every module that has it, but a user of the bare layer only on the
        # layer: forward it so the router's k schedule follows too.
        self.num_updates = num_updates
        self.router.set_num_updates(num_updates)

    def gating_dropped(self) -> bool:
        return self.training and gating_dropout_fires(self.gating_dropout, self.seed, self.num_updates,
                                                      self.layer_index)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None,
                aux_mode: Optional[AuxMode] = None) -> torch.Tensor:
        """x (..., M), padding_mask (...) True at padding -> (..., M).  aux_mode: what the call
        computes besides the output (AuxMode or its name), left in self.aux; None: self.aux_mode
        if set, else everything in training and nothing in evaluation."""
        mode = self.resolve_aux_mode(aux_mode)
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        if padding_mask is not None:
            rows = (~padding_mask.reshape(-1)).nonzero().squeeze(1)
            tokens = flat.index_select(0, rows)
        else:
            rows, tokens = None, flat
        if self.gating_dropped():
            dropped = self._forward_local_topk if self.gating_dropout_mode == "local_topk" else \
                self._forward_gating_dropout
            out, aux = dropped(tokens, mode)
        elif decode.applies(self, tokens, mode):
            with decode.one_intra_op_thread():
                out, aux = self._forward_decode_step(tokens)
        else:
            out, aux = self._forward_routed(tokens, mode)
        self.aux = aux
        if rows is not None:
            out = flat.new_zeros(flat.shape).index_copy(0, rows, out)
        return out.view(shape)

    def resolve_aux_mode(self, aux_mode=None) -> AuxMode:
        """The mode of a call given aux_mode: the argument, else self.aux_mode, else the default."""
        if aux_mode is not None:
            return AuxMode.of(aux_mode)
        if self.aux_mode is not None:
            return self.aux_mode
        return default_aux_mode(self.training)

    @contextlib.contextmanager
    def recomputing(self, aux_mode: AuxMode):
        """Activation checkpointing's recomputation of a forward, in backward: it runs in
        `aux_mode`, the mode the forward resolved (by backward the caller's computing_aux block
        has closed, and another mode would save other tensors than the forward did), and its
        losses and statistics are dropped (the forward's were already collected: counted once)."""
        kept = self.aux, self.aux_mode
        self.aux_mode = aux_mode
        try:
            yield
        finally:
            self.aux, self.aux_mode = kept

    def _forward_routed(self, tokens: torch.Tensor, mode: AuxMode):
        # The router sees the tokens as they come (it computes in fp32 anyway); the experts'
        # copy is cast to their compute dtype before dispatch, so under autocast the
        # all-to-all carries half-precision rows, as a dense FFN's GEMM would read them.
        routing = self.router(tokens, mode)
        dtype = compute_dtype(tokens)
        # Dropless evaluation with every expert local: S * k slots, all kept, so the split sizes
        # need not be read on the host when the experts take them on the device (the grouped
        # GEMM): no host sync in a decoder step.
        num_kept = None
        if (not self.training and self.router.eval_keeps_all_slots and self.comm.world_size == 1
                and self.router.current_capacity_factor() is None
                and self.experts.takes_device_counts(tokens.device, dtype)):
            num_kept = routing.expert_index.numel()
        plan = plan_dispatch(routing.expert_index, routing.keep, routing.gate, self.router.num_experts, num_kept,
                             read_counts=self.comm.read_counts)
        sent = dispatch(tokens if tokens.dtype == dtype else tokens.to(dtype), plan)
        local_in, local_counts, local_counts_t, handle = self.comm.exchange(sent, plan.counts, plan.host)
        expert_out = self.comm.exchange_back(self.experts(local_in, local_counts, local_counts_t), handle)
        # Output in the input's dtype: under autocast that is the fp32 residual stream, which
        # the fp32 combine feeds without another rounding.
        out = combine(expert_out, plan, tokens.shape[0])
        if out.dtype != tokens.dtype:
            out = out.to(tokens.dtype)
        stats = self.routing_stats(tokens, routing, plan, sent.element_size()) if mode.stats else None
        return out, MoEAux(dict(routing.losses), stats)

    def _forward_local_topk(self, tokens: torch.Tensor, mode: AuxMode):
        """A local_topk dropped step (training only): the router restricted to this rank's L
        experts numbers its choices 0..L-1, so the plan is over the local experts and the rows
        go straight to them, with no communicator call (no all-to-all, no count exchange)."""
        first, num_local = self.comm.local_expert_ids()[0], self.experts.num_local
        with self.router.restricted_to(first, num_local):
            routing = self.router(tokens, mode)
        dtype = compute_dtype(tokens)
        plan = plan_dispatch(routing.expert_index, routing.keep, routing.gate, num_local, read_counts=host_counts)
        sent = dispatch(tokens if tokens.dtype == dtype else tokens.to(dtype), plan)
        out = combine(self.experts(sent, plan.counts_list, plan.counts), plan, tokens.shape[0])
        if out.dtype != tokens.dtype:
            out = out.to(tokens.dtype)
        stats = None
        if mode.stats:
            # Logged like gate_drop's step: the load over all E experts (zero off this rank),
            # moe_gating_dropped = 1 and no all-to-all bytes.
            local = LocalComm(num_local)
            stats = self.routing_stats(tokens, routing, plan, sent.element_size(), local)
            per_expert = plan.counts.new_zeros(self.router.num_experts)
            per_expert.narrow(0, first, num_local).copy_(plan.counts.detach())
            stats = dataclasses.replace(stats, tokens_per_expert=per_expert, gating_dropped=torch.ones_like(
                stats.gating_dropped))
        return out, MoEAux(dict(routing.losses), stats)  # the router's losses over the local experts

    def _forward_decode_step(self, tokens: torch.Tensor):
        """A decoder step (decode.applies, so the mode is NONE): the router's forward as any
        call's, then the experts of the few rows directly (decode.few_rows_ffn)."""
        # forward, not __call__: the hook dispatch would be ~1% of a one-row step, and a decoder
        # step has never run the router's hooks (they see every call that builds a plan).
        routing = self.router.forward(tokens, AuxMode.NONE)
        return decode.few_rows_ffn(self.experts, tokens, routing.expert_index, routing.gate), MoEAux()

    def routing_stats(self, tokens, routing, plan, elem_size: int, comm=None) -> RoutingStats:
        # Every field a device tensor made by a kernel (new_full, reductions): no copy from the
        # host, so statistics cost no sync until the criterion reads all layers' at once.
        elem = elem_size * tokens.shape[1]
        scalar = functools.partial(tokens.new_full, (), dtype=torch.float32)
        return RoutingStats(
            num_tokens=scalar(float(tokens.shape[0])),
            requested_slots=scalar(float(routing.expert_index.numel())),
            tokens_per_expert=plan.counts.detach(),
            dropped_by_capacity=routing.dropped_by_capacity.detach(),
            gate_entropy_sum=entropy_sum(routing.probs, tokens.device),
            gating_dropped=scalar(0.0),
            a2a_bytes=(comm or self.comm).remote_rows(plan.counts) * (2 * elem),
        )

    def _forward_gating_dropout(self, tokens: torch.Tensor, mode: AuxMode):
        num_local = self.experts.num_local
        n = tokens.shape[0]
        if self.gating_dropout_mode == "gate_expert_drop":
            out = tokens.new_zeros(tokens.shape)
            local_counts = [0] * num_local
        else:
            # Round-robin over local experts, grouped by expert for the GEMMs.
            assignment = torch.arange(n, device=tokens.device) % num_local
            order = torch.sort(assignment, stable=True).indices
            local_counts = [(n - e + num_local - 1) // num_local for e in range(num_local)]
            # the same counts computed on the device (no copy of the host list)
            local_counts_t = torch.div(n - torch.arange(num_local, device=tokens.device) + num_local - 1,
                                       num_local, rounding_mode="floor")
            expert_out = self.experts(tokens.index_select(0, order), local_counts, local_counts_t).to(tokens.dtype)
            out = tokens.new_zeros(tokens.shape).index_copy(0, order, expert_out)
        stats = None
        if mode.stats:
            per_expert = torch.zeros(self.router.num_experts, dtype=torch.long, device=tokens.device)
            if self.gating_dropout_mode != "gate_expert_drop":
                per_expert.narrow(0, self.comm.local_expert_ids()[0], num_local).copy_(local_counts_t)
            scalar = functools.partial(tokens.new_full, (), dtype=torch.float32)
            stats = RoutingStats(
                num_tokens=scalar(float(n)), requested_slots=scalar(float(n)),
                tokens_per_expert=per_expert, dropped_by_capacity=scalar(0.0),
                gate_entropy_sum=scalar(0.0), gating_dropped=scalar(1.0),
                a2a_bytes=scalar(0.0))
        # The router took no part in this step; tie its parameters to the output with weight 0
        # so that data-parallel training (DDP without find_unused_parameters) sees every
        # non-expert parameter used on every rank.  Their gradient is exactly zero.
        for p in self.router.parameters():
            out = out + 0.0 * p.sum()
        return out, MoEAux({}, stats)  # no balance loss from a layer that did not route


def build_moe_layer(cfg, model_dim: int, hidden_dim: int, layer_index: int = 0, activation: str = "relu",
                    comm=None, split_hidden_dim: bool = False) -> MoELayer:
    """Build a MoE layer from a MoEConfig.  With split_hidden_dim, E fresh
    experts of hidden size hidden_dim / E, as many parameters as one FFN of hidden_dim
    (SMoE-Dropout's parameter-matched setting; FFNExperts.split_dense copies a trained FFN's).
    cfg was validated when it was made; what it could not know then, the ranks a comm spreads
    the experts over, is checked here (cfg.check_world_size, pure and cheap); the constructors
    below check only their own arguments."""
    if comm is not None:
        cfg.check_world_size(comm.world_size)
    # Validation used to build a router of input size 1 here, drawing from the global RNG
    # (top1/top2/random initialise their weight): the same draw is kept, so everything built
    # after this layer starts from the weights it started from before, at the same seed.
    ROUTERS[cfg.router].from_config(cfg, 1)
    if split_hidden_dim:
        if hidden_dim % cfg.num_experts:
            raise MoEUsageError(f"--moe-split-ffn needs the FFN dim ({hidden_dim}) divisible by "
                             f"--moe-expert-count={cfg.num_experts}")
        hidden_dim //= cfg.num_experts
    comm = comm if comm is not None else LocalComm(cfg.num_experts)
    if comm.num_local_experts == cfg.num_experts:
        experts = FFNExperts(comm.num_local_experts, model_dim, hidden_dim, activation, cfg.expert_dropout)
    else:
        # The constructor's default init draws from the global RNG for its L local experts, so
        # everything built after this layer would start differently on each world size.  Draw
        # what one process's E experts draw instead (and drop it): an expert-parallel model then
        # starts equal to its single-process twin, shared parameters included.
        with torch.random.fork_rng(devices=[]):
            experts = FFNExperts(comm.num_local_experts, model_dim, hidden_dim, activation, cfg.expert_dropout)
        FFNExperts(cfg.num_experts, model_dim, hidden_dim, activation, cfg.expert_dropout)
    # Seeded per (seed, layer, global expert): the same experts on any world size.
    experts.reset_parameters(comm.local_expert_ids(), seed=(cfg.seed * 7919 + layer_index) * 65537)
    return MoELayer(cfg.build_router(model_dim), experts, layer_index, comm, cfg.gating_dropout,
                    cfg.gating_dropout_mode, cfg.seed)
