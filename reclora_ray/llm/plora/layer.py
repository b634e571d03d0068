"""The personalized LoRA layer and its gate (paper section 3.2, Eq. 11, 13, 14).

For a wrapped Linear W (d_in -> d_out), N_m meta-LoRAs of rank r stacked as
A_cat (N_m*r, d_in) and B_cat (d_out, N_m*r), and per-sample gate weights alpha (batch, N_m):

    y = x W^T + s * sum_k alpha_k (x A_k^T) B_k^T
      = x W^T + s * ((x A_cat^T) * repeat(alpha, r)) B_cat^T

Two matmuls, the cost of one LoRA of rank N_m*r; no per-sample d_in x d_out matrix is formed.
A and B use PEFT's layout (lora_A: rank x d_in, lora_B: d_out x rank), so one user's adapter
is a standard PEFT LoRA (see io.export_user_adapter).
"""

from __future__ import annotations

import math
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D


def matches_target(name: str, targets: list[str]) -> bool:
    """PEFT's rule for a list of target names: the full name or its last dotted components."""
    return any(name == t or name.endswith("." + t) for t in targets)


class Gate(nn.Module):
    """alpha = softmax(beta / tp) from the CRM representation R_c (batch, d_c).

    arch "paper" (Eq. 13): beta = W2 ReLU(LN(W1 R_c + b1)) + b2.
    arch "authors" (their code): beta = W2 ReLU(W1 LN(R_c) + b1) + b2.
    Dropout (train mode only) sits before W2 in both, as in the authors' code.
    """

    def __init__(
        self,
        crm_dim: int,
        hidden: int,
        n_meta: int,
        temperature: float,
        dropout: float = 0.0,
        arch: Literal["paper", "authors"] = "paper",
    ):
        super().__init__()
        self.arch = arch
        self.temperature = temperature
        self.fc1 = nn.Linear(crm_dim, hidden)
        self.norm = nn.LayerNorm(hidden if arch == "paper" else crm_dim)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, n_meta)

    def forward(self, crm_repr: torch.Tensor) -> torch.Tensor:
        crm_repr = crm_repr.to(self.fc1.weight)  # dtype and device of the gate
        if self.arch == "paper":
            hidden = torch.relu(self.norm(self.fc1(crm_repr)))
        else:
            hidden = torch.relu(self.fc1(self.norm(crm_repr)))
        beta = self.fc2(self.dropout(hidden))
        return torch.softmax(beta / self.temperature, dim=-1)


def base_features(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a wrappable layer: nn.Linear (bitsandbytes 8/4-bit included) or GPT-2's Conv1D."""
    if isinstance(module, nn.Linear):  # bnb.nn.Linear8bitLt / Linear4bit subclass nn.Linear
        return module.in_features, module.out_features
    if isinstance(module, Conv1D):
        return module.nx, module.nf
    raise TypeError(
        f"cannot wrap a {type(module).__module__}.{type(module).__name__}: personalized LoRA wraps "
        "torch.nn.Linear (bitsandbytes 8-bit/4-bit included) and transformers Conv1D"
    )


class PLoRALinear(nn.Module):
    """A frozen base layer plus N_m meta-LoRAs mixed by per-sample gate weights.

    `gated=False` is plain LoRA of rank n_meta*r (no gate; the `lora` and `lora_same_params`
    variants). The gate weights reach the layer through `alpha`, which
    PersonalizedLoRAModel.routing() sets for the span of one forward and always clears.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        *,
        name: str,
        r: int,
        n_meta: int,
        scaling: float,
        dropout: float = 0.0,
        gated: bool = True,
        mixing: Literal["paper", "weights"] = "paper",
        gate: Optional[Gate] = None,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.in_features, self.out_features = base_features(base_layer)
        self.base_layer = base_layer
        self.name = name
        self.r = r
        self.n_meta = n_meta
        self.scaling = scaling
        self.gated = gated
        self.mixing = mixing
        self.gate = gate  # only with a per-layer gate
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = next(base_layer.parameters()).device
        rank = n_meta * r
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype, device=device))
        # PEFT's default init, per meta-LoRA (as the authors' code): A kaiming-uniform (a = sqrt(5)),
        # B = 0, so the wrapped model starts equal to the base.
        with torch.no_grad():
            for block in self.lora_A.view(n_meta, r, self.in_features):
                nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        self.alpha: Optional[torch.Tensor] = None  # (batch, n_meta) while routed

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        # The adapter's parameters stay fp32 (so do their gradients and optimizer state); the two
        # matmuls run in the activations' dtype, bf16 over a bf16 base, like autocast would.
        compute = x.dtype if x.dtype.is_floating_point else self.lora_A.dtype
        hidden = F.linear(self.lora_dropout(x), self.lora_A.to(compute))  # (..., n_meta*r)
        if self.gated:
            hidden = self._mix(hidden, self._routed_alpha(x))
        delta = F.linear(hidden, self.lora_B.to(compute))
        return result + (delta * self.scaling).to(result.dtype)

    def _mix(self, hidden: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        # alpha (batch, n_meta) -> (batch, 1, ..., n_meta, 1): broadcast over the token dimensions.
        alpha = alpha.to(hidden.dtype).view(alpha.shape[0], *[1] * (hidden.dim() - 2), self.n_meta, 1)
        per_meta = hidden.unflatten(-1, (self.n_meta, self.r))
        if self.mixing == "paper":  # sum_k alpha_k (x A_k) B_k^T
            return (per_meta * alpha).flatten(-2)
        # (sum_k alpha_k A_k)(sum_k alpha_k B_k)^T: x A_p, then spread over the B_k with alpha again.
        x_ap = (per_meta * alpha).sum(-2, keepdim=True)
        return (x_ap * alpha).flatten(-2)

    def _routed_alpha(self, x: torch.Tensor) -> torch.Tensor:
        if self.alpha is None:
            raise RuntimeError(
                f"{self.name}: no gate weights set. Call the model through PersonalizedLoRAModel.forward "
                "(with crm_repr) or inside `with model.routing(crm_repr):`; for activation checkpointing "
                "use PersonalizedLoRAModel.activation_checkpointing_enable()"
            )
        if x.dim() < 2 or x.shape[0] != self.alpha.shape[0]:
            raise ValueError(
                f"{self.name}: input of shape {tuple(x.shape)} but the gate weights were computed for "
                f"{self.alpha.shape[0]} samples; the layer must see the batch the model was called with"
            )
        return self.alpha

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.r}, n_meta={self.n_meta}, "
            f"scaling={self.scaling}, gated={self.gated}, mixing={self.mixing}"
        )
