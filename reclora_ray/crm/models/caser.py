"""Caser (Tang & Wang, WSDM 2018): the behaviour matrix (K x D) as an image; horizontal filters of
several heights find sequential patterns (max-pooled over time), vertical filters weigh positions.
R_c = [profile, horizontal features, vertical features]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reclora_ray.config import ConfigError
from reclora_ray.crm.models.base import CRM, Batch


class Caser(CRM):
    name = "caser"

    def __init__(self, spec, cfg, tables=None):
        super().__init__(spec, cfg, tables)
        c = cfg.caser
        d, k = self.embedding.item_dim, spec.history_len
        if any(h < 1 or h > k for h in c.horizontal_heights):
            raise ConfigError(f"crm.caser.horizontal_heights: each height must be in 1..{k} (the history length)")
        self.horizontal = nn.ModuleList(nn.Conv2d(1, c.horizontal_kernels, (h, d)) for h in c.horizontal_heights)
        self.vertical = nn.Conv2d(1, c.vertical_kernels, (k, 1))
        width = c.horizontal_kernels * len(c.horizontal_heights) + c.vertical_kernels * d
        self._build_head(self.embedding.profile_dim + width)

    def represent(self, batch: Batch) -> torch.Tensor:
        behaviours, _ = self.embedding.history(batch)  # padding rows are already zero
        image = behaviours.flatten(-2).unsqueeze(1)  # (B, 1, K, D)
        horizontal = [F.relu(conv(image)).squeeze(-1).amax(-1) for conv in self.horizontal]
        vertical = self.vertical(image).flatten(1)
        features = self.dropout(torch.cat([*horizontal, vertical], dim=1))
        return torch.cat([self.embedding.profile(batch), features], dim=1)
