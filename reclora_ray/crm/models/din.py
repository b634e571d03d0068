"""DIN (Zhou et al., KDD 2018): a local activation unit weighs each behaviour by its relevance to
the target (unnormalized, as in the paper), and the weighted sum is the user's interest.
R_c = [profile, interest]."""

from __future__ import annotations

import torch
from torch import nn

from reclora_ray.crm.models.base import CRM, MLP, Batch


class ActivationUnit(nn.Module):
    def __init__(self, d: int, hidden: list[int], dropout: float):
        super().__init__()
        self.mlp = MLP(4 * d, hidden, dropout, out=1)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = query.unsqueeze(1).expand_as(keys)
        weights = self.mlp(torch.cat([q, keys, q - keys, q * keys], dim=-1)).squeeze(-1) * mask
        return (weights.unsqueeze(-1) * keys).sum(1)


class DIN(CRM):
    name = "din"

    def __init__(self, spec, cfg, tables=None):
        super().__init__(spec, cfg, tables)
        d = self.embedding.item_dim
        self.activation = ActivationUnit(d, cfg.din.attention_hidden, cfg.dropout)
        self._build_head(self.embedding.profile_dim + d)

    def represent(self, batch: Batch) -> torch.Tensor:
        behaviours, mask = self.embedding.history(batch)
        interest = self.activation(self.embedding.target(batch), behaviours.flatten(-2), mask)
        return torch.cat([self.embedding.profile(batch), interest], dim=1)
