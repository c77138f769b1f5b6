"""What every router returns, and the pieces routers share."""
import contextlib
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from ..aux_mode import AuxMode
from ..capacity import apply_capacity, expert_capacity
from ..errors import MoEUsageError


class Routing:
    """Routing decision for S (non-padding) tokens and k slots per token.

    expert_index: (S, k) long, global expert id of each slot.
    gate:         (S, k) fp32 combine weight; 0 where the slot is not kept.
    keep:         (S, k) bool, slot survives the second-expert policy and capacity.
    probs:        (S, E) fp32 router distribution, for statistics (entropy); may be None.
    losses:       weighted auxiliary losses of this router, by name.
    dropped_by_capacity: number of slots removed by capacity (0-dim tensor, no host sync).

    A router passes keep=None when it kept every slot and dropped_by_capacity=None when capacity
    dropped none (what limit_capacity returns then): the all-True mask and the zero are made on
    first read, so a decoder step, which reads only expert_index and gate, does not pay for them.

    A token sends at most one slot to an expert (its k experts are distinct).
    """

    __slots__ = ("expert_index", "gate", "_keep", "probs", "losses", "_dropped")

    def __init__(self, expert_index: torch.Tensor, gate: torch.Tensor, keep: Optional[torch.Tensor] = None,
                 probs: Optional[torch.Tensor] = None, losses: Optional[Dict[str, torch.Tensor]] = None,
                 dropped_by_capacity: Optional[torch.Tensor] = None):
        self.expert_index, self.gate, self._keep, self.probs = expert_index, gate, keep, probs
        self.losses = {} if losses is None else losses
        self._dropped = dropped_by_capacity

    @property
    def keep(self) -> torch.Tensor:
        if self._keep is None:
            self._keep = torch.ones_like(self.expert_index, dtype=torch.bool)
        return self._keep

    @property
    def dropped_by_capacity(self) -> torch.Tensor:
        if self._dropped is None:
            self._dropped = self.expert_index.new_zeros((), dtype=torch.long)
        return self._dropped


class Router(nn.Module):
    """Base router: a linear map M -> E computed in fp32, plus capacity handling and the
    evaluation-time k.

    capacity_factor / eval_capacity_factor: None means dropless.  A subclass registers itself
    (registry.register_router), builds itself from a MoEConfig (`from_config`) and says which
    capacity factors apply when the flags are not given (`default_capacity_factors`).
    """

    default_capacity_factors = (None, None)  # (training, evaluation): dropless unless a router says otherwise
    variable_k = False  # True for routers whose k may change at evaluation (--moe-eval-top-k)
    # True for routers whose evaluation keeps every slot unless capacity drops it (then a
    # dropless evaluation dispatches exactly S * k slots, known without reading `keep`).
    eval_keeps_all_slots = False
    # True for routers that honour `restricted_to` (read their weight through `routed_rows` and
    # count experts with `routed_experts`): Gating Dropout's local_topk mode needs it.
    restrictable = False
    k_flag = "--moe-top-k"  # the flag that sets the router's (largest training) k, for error messages
    # The router's tensors fixed at initialisation (buffers no optimizer changes): equal in every
    # checkpoint of a run, which moe-average checks.
    frozen_tensors: Tuple[str, ...] = ()

    def __init__(self, model_dim: int, num_experts: int, k: int,
                 capacity_factor: Optional[float] = None,
                 eval_capacity_factor: Optional[float] = None,
                 eval_k: Optional[int] = None):
        super().__init__()
        # The arguments' own rules; the flags' rules (the same, in the flags' names) are
        # MoEConfig.validate's, which every router built from a config has passed.
        if num_experts < 1:
            raise ValueError(f"{type(self).__name__}: num_experts must be >= 1 (got {num_experts})")
        check_k(self, k, num_experts)
        for name, cf in (("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
            if cf is not None and not cf > 0:
                raise ValueError(f"{type(self).__name__}: {name} must be > 0, or None for no capacity limit (got {cf})")
        self.model_dim, self.num_experts, self.k = model_dim, num_experts, k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.num_updates = 0
        self.eval_k = None
        self.set_eval_k(eval_k)
        self.restriction: Optional[Tuple[int, int]] = None  # (first, count) inside restricted_to

    @contextlib.contextmanager
    def restricted_to(self, first: int, count: int):
        """Route over experts [first, first + count) only, as a router of `count` experts whose
        weight rows are those experts' rows: softmax, top-k, gates, capacity and auxiliary losses
        all over that block, and expert_index numbered inside it (0 = expert `first`).  A softmax
        over the block's logits is the softmax over all logits with the others masked to -inf,
        so the gates are the router's usual ones restricted to the block.  Gating Dropout's
        local_topk mode uses it with this rank's experts (MoELayer)."""
        if not self.restrictable:
            raise MoEUsageError(f"--moe-router {getattr(self, 'name', type(self).__name__)} cannot route over a "
                                f"subset of the experts (--moe-gating-dropout-mode local_topk)")
        if not (0 <= first and 1 <= count and first + count <= self.num_experts):
            raise MoEUsageError(f"experts [{first}, {first + count}) are not a block of the "
                                f"{self.num_experts} experts of the router")
        if self.current_k() > count:
            raise MoEUsageError(f"k={self.current_k()} ({self.k_flag}) exceeds the {count} expert(s) to route over "
                                f"(--moe-gating-dropout-mode local_topk)")
        self.restriction = (first, count)
        try:
            yield
        finally:
            self.restriction = None

    def routed_experts(self) -> int:
        """Experts this call routes over: all, or the block of restricted_to."""
        return self.num_experts if self.restriction is None else self.restriction[1]

    def routed_rows(self, weight: torch.Tensor) -> torch.Tensor:
        """The rows of an (E, M) router weight that take part in this call (a view, so the
        other rows get an exact zero gradient)."""
        if self.restriction is None:
            return weight
        return weight.narrow(0, *self.restriction)

    def forward(self, x: torch.Tensor, aux_mode: AuxMode = AuxMode.ALL) -> Routing:
        """The Routing of the S rows of x (S, M).  aux_mode (given by the layer): with NONE a
        router skips its losses and any probabilities kept for statistics only.  The same code
        serves every caller: a decoder step (moe/decode.py) takes expert_index and gate of an
        evaluation call with NONE, so building the rest must stay cheap there: no capacity applies in
        that case, and a keep of None (every slot kept) makes nothing (Routing)."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, cfg, model_dim: int) -> "Router":
        """The router for a validated MoEConfig (cfg.capacity_factors() gives the capacity)."""
        raise NotImplementedError

    @classmethod
    def config_k(cls, cfg) -> int:
        """The (largest training) k of the router `from_config` builds, which MoEConfig.validate
        checks against the expert count under `k_flag`: --moe-top-k unless a router says otherwise."""
        return cfg.top_k

    @classmethod
    def config_for_experts(cls, cfg, keep: int) -> Dict[str, object]:
        """The MoEConfig fields (name: new value) that must change when only `keep` of cfg's experts
        remain (moe-prune); none unless a router says otherwise."""
        return {}

    @classmethod
    def rows_of_experts(cls, name: str, tensor: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """The router's tensor `name` (e.g. wg.weight) for the experts `kept` only (expert ids, in
        their new order; moe-prune): every tensor of a router holds one row per expert unless the
        router says otherwise."""
        if tensor.dim() == 0 or tensor.shape[0] < 1 + int(kept.max()):
            raise ValueError(f"{cls.__name__}: {name} has no row per expert (shape {tuple(tensor.shape)})")
        return tensor.index_select(0, kept)

    def set_num_updates(self, num_updates: int):
        self.num_updates = num_updates

    def set_eval_k(self, k: Optional[int]):
        """Experts per token in evaluation (self-slimmable inference); None: the training k.
        The one way the evaluation-time k reaches a router (config, task flag, scripts)."""
        if k is not None:
            if not self.variable_k:
                raise ValueError(f"{type(self).__name__} routes a fixed k: eval_k must be None (got {k})")
            check_k(self, k, self.num_experts, "eval_k")
        self.eval_k = k

    def training_k(self) -> int:
        """k in training (a schedule may make it vary); self.k is the final one."""
        return self.k

    def current_k(self) -> int:
        """k of this forward: in evaluation the evaluation-time k, else the final k."""
        if self.training:
            return self.training_k()
        return self.eval_k if self.eval_k is not None else self.k

    def current_capacity_factor(self) -> Optional[float]:
        return self.capacity_factor if self.training else self.eval_capacity_factor

    def limit_capacity(self, expert_index, keep: Optional[torch.Tensor], k_for_capacity: int):
        """Apply the current capacity to the slots `keep` marks (None: every slot); returns (keep,
        number of slots dropped).  When no capacity applies that is the `keep` passed in (the
        same object, so a router can skip masking its gates) and None (nothing dropped)."""
        cf = self.current_capacity_factor()
        if cf is None:
            return keep, None
        num_experts = self.routed_experts()  # restricted_to: capacity shared over the block only
        capacity = expert_capacity(expert_index.shape[0], num_experts, k_for_capacity, cf)
        if capacity >= expert_index.shape[0]:
            # A token sends at most one slot to an expert, so no expert can receive more than
            # S slots: this capacity drops nothing (large eval capacity factors, small E).
            return keep, None
        if keep is None:
            keep = torch.ones_like(expert_index, dtype=torch.bool)
        new_keep = apply_capacity(expert_index, keep, num_experts, capacity)
        return new_keep, (keep.sum() - new_keep.sum())


def fields_at_most(cfg, limit: int, *names: str) -> Dict[str, int]:
    """{name: limit} for each of cfg's fields `names` that is set and above limit."""
    return {name: limit for name in names if getattr(cfg, name) is not None and getattr(cfg, name) > limit}


def check_k(router, k: int, num_experts: int, name: str = "k"):
    if not 1 <= k <= num_experts:
        raise ValueError(f"{type(router).__name__}: {name} must be between 1 and num_experts={num_experts} (got {k})")


def fp32_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Router logits in fp32 whatever the model's dtype: softmax over experts in fp16 is unstable,
    and a near tie between two experts rounded in bf16 (8 bits) flips the routing.  Autocast is
    switched off here, since it would run this linear map in half precision again; everything
    downstream of the logits (softmax, top-k, gates, aux losses) then stays fp32 by itself."""
    if not torch.is_autocast_enabled(x.device.type):
        # No autocast to switch off: entering and leaving the context costs more than this
        # linear map on the few rows of a decoder step.
        return torch.nn.functional.linear(x.float(), weight.float())
    with torch.autocast(x.device.type, enabled=False):
        return torch.nn.functional.linear(x.float(), weight.float())
