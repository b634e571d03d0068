"""DIN (Zhou et al., KDD 2018): a local activation unit weighs each behaviour by its relevance to
the target (unnormalized, as in the paper), and the weighted sum is the user's interest.
R_c = [profile, interest, mean of the last `crm.recent_k` behaviours (the user's current taste)]."""

from __future__ import annotations

import torch
from torch import nn

from reclora_ray.crm.models.base import CRM, MLP, Batch, recent_mean


class ActivationUnit(nn.Module):
    """DIN's activation unit: an MLP on [q, k, q - k, q * k] per behaviour, one weight each.

    The first layer is applied as W_q q + W_k k + W_p (q * k): the same function (q - k is
    linear, so W [q, k, q - k, q * k] folds into these three), without building the (B, K, 4D)
    input, and the query term once per sample instead of once per behaviour.
    """

    def __init__(self, d: int, hidden: list[int]):
        super().__init__()
        self.query = nn.Linear(d, hidden[0])
        self.key = nn.Linear(d, hidden[0], bias=False)
        self.product = nn.Linear(d, hidden[0], bias=False)
        self.mlp = MLP(hidden[0], hidden[1:], dropout=0.0, out=1)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = query.unsqueeze(1)
        first = torch.relu(self.query(q) + self.key(keys) + self.product(q * keys))
        weights = self.mlp(first).squeeze(-1) * mask
        return (weights.unsqueeze(-1) * keys).sum(1)


class DIN(CRM):
    name = "din"

    def __init__(self, spec, cfg, tables=None):
        super().__init__(spec, cfg, tables)
        d = self.embedding.item_dim
        self.activation = ActivationUnit(d, cfg.din.attention_hidden)
        self.recent_k = min(cfg.recent_k, spec.history_len)
        self._build_head(self.embedding.profile_dim + (2 if self.recent_k else 1) * d)

    def represent(self, batch: Batch) -> torch.Tensor:
        behaviours, mask = self.embedding.history(batch)
        behaviours = behaviours.flatten(-2)
        parts = [self.embedding.profile(batch), self.activation(self.embedding.target(batch), behaviours, mask)]
        if self.recent_k:
            parts.append(recent_mean(behaviours, mask, self.recent_k))
        return torch.cat(parts, dim=1)
