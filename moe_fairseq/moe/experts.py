"""Feed-forward experts stored as stacked weights, one GEMM pair per expert."""
import math
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class FFNExperts(nn.Module):
    """`num_local` experts M -> F -> M.  Every parameter carries `expert = True`, fairseq's mark
    for weights that live on one rank and must stay out of the data-parallel all-reduce.

    expert_dropout: dropout on the hidden activations inside the experts only (Switch
    fine-tuning uses e.g. 0.4 here against 0.1 elsewhere).
    """

    def __init__(self, num_local: int, model_dim: int, hidden_dim: int, activation: str = "relu",
                 expert_dropout: float = 0.0):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"--activation-fn for experts must be one of {', '.join(ACTIVATIONS)} (got {activation!r})")
        if not 0 <= expert_dropout < 1:
            raise ValueError(f"--moe-expert-dropout must be in [0, 1) (got {expert_dropout})")
        self.num_local, self.model_dim, self.hidden_dim = num_local, model_dim, hidden_dim
        self.activation = ACTIVATIONS[activation]
        self.expert_dropout = expert_dropout
        # Stored as (in, out) so each expert is a plain addmm without a transpose.
        self.w1 = nn.Parameter(torch.empty(num_local, model_dim, hidden_dim))
        self.b1 = nn.Parameter(torch.empty(num_local, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_local, hidden_dim, model_dim))
        self.b2 = nn.Parameter(torch.empty(num_local, model_dim))
        for p in self.parameters():
            p.expert = True
        self.reset_parameters()

    def reset_parameters(self):
        # nn.Linear's default init per expert, like fairseq's dense fc1/fc2.
        for w, b, fan_in in ((self.w1, self.b1, self.model_dim), (self.w2, self.b2, self.hidden_dim)):
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    def forward(self, x: torch.Tensor, counts: List[int]) -> torch.Tensor:
        """x: (N, M) rows grouped by local expert, counts[e] rows for expert e."""
        outs = []
        for e, rows in enumerate(torch.split(x, counts)):
            if rows.shape[0] == 0:
                continue
            h = self.activation(torch.addmm(self.b1[e], rows, self.w1[e]))
            if self.expert_dropout > 0:
                h = F.dropout(h, self.expert_dropout, self.training)
            outs.append(torch.addmm(self.b2[e], h, self.w2[e]))
        if not outs:
            return x.new_zeros(0, self.model_dim) + 0 * self.b2.sum()
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    @classmethod
    def split_dense(cls, fc1: nn.Linear, fc2: nn.Linear, num_experts: int, activation="relu",
                    expert_dropout=0.0) -> "FFNExperts":
        """E experts of hidden size F/E holding exactly the dense FFN's weights (SMoE-Dropout's
        parameter-matched setting).  With every expert active and all gates equal to 1 the sum
        of the experts reproduces the dense FFN, except that fc2's bias is added E times: it is
        divided by E here so that this identity holds."""
        hidden = fc1.out_features
        if hidden % num_experts:
            raise ValueError(f"--encoder/decoder-ffn-embed-dim={hidden} is not divisible by "
                             f"--moe-expert-count={num_experts}")
        experts = cls(num_experts, fc1.in_features, hidden // num_experts, activation, expert_dropout)
        with torch.no_grad():
            experts.w1.copy_(fc1.weight.t().reshape(fc1.in_features, num_experts, -1).transpose(0, 1))
            experts.b1.copy_(fc1.bias.view(num_experts, -1))
            experts.w2.copy_(fc2.weight.t().reshape(num_experts, -1, fc2.out_features))
            experts.b2.copy_(fc2.bias.unsqueeze(0).expand(num_experts, -1) / num_experts)
        return experts
