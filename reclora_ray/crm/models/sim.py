"""SIM (Pi et al., CIKM 2020), soft-search variant, over the retrieved long history.

General search unit: keep the `search_k` behaviours whose embedding has the largest inner
product with the target's. Exact search unit: multi-head target attention over them, with an
embedding of each behaviour's recency. R_c = [profile, ESU interest, mean of all behaviours,
mean of the last `crm.recent_k` behaviours] (the last one: the user's current taste, which
target-relevance search alone does not see).
"""

from __future__ import annotations

import torch
from torch import nn

from reclora_ray.config import ConfigError
from reclora_ray.crm.models.base import CRM, Batch, attention_pool, masked_mean, recent_mean


class SIM(CRM):
    name = "sim"

    def __init__(self, spec, cfg, tables=None):
        super().__init__(spec, cfg, tables)
        d = self.embedding.item_dim
        if d % cfg.sim.heads:
            raise ConfigError(f"crm.sim.heads: {cfg.sim.heads} does not divide the behaviour width {d}")
        self.search_k = min(cfg.sim.search_k, spec.history_len)
        self.recency = nn.Embedding(spec.history_len, d)
        nn.init.normal_(self.recency.weight, std=0.01)
        self.layers = nn.ModuleList(
            nn.MultiheadAttention(d, cfg.sim.heads, dropout=cfg.dropout, batch_first=True)
            for _ in range(cfg.sim.attention_layers)
        )
        self.recent_k = min(cfg.recent_k, spec.history_len)
        self._build_head(self.embedding.profile_dim + (3 if self.recent_k else 2) * d)

    def represent(self, batch: Batch) -> torch.Tensor:
        behaviours, mask = self.embedding.history(batch)
        behaviours = behaviours.flatten(-2)
        target = self.embedding.target(batch)
        relevance = (behaviours * target.unsqueeze(1)).sum(-1).masked_fill(~mask, float("-inf"))
        chosen = relevance.topk(self.search_k, dim=1).indices.sort(dim=1).values  # keep time order
        keys = behaviours.gather(1, chosen.unsqueeze(-1).expand(-1, -1, behaviours.shape[-1]))
        keys = keys + self.recency(chosen)
        key_mask = mask.gather(1, chosen)
        interest = target
        for attention in self.layers:
            interest = interest + attention_pool(attention, interest, keys, key_mask)
        parts = [self.embedding.profile(batch), interest, masked_mean(behaviours, mask)]
        if self.recent_k:
            parts.append(recent_mean(behaviours, mask, self.recent_k))
        return torch.cat(parts, dim=1)
