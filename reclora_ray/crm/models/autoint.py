"""AutoInt (Song et al., CIKM 2019) over all fields (the history average-pooled into extra
fields): stacked multi-head self-attention across fields with residual connections.
R_c = the flattened output of the last interacting layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reclora_ray.config import ConfigError
from reclora_ray.crm.models.base import CRM, Batch


class InteractingLayer(nn.Module):
    def __init__(self, d_in: int, d_out: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=False)
        self.residual = nn.Linear(d_in, d_out, bias=False)

    def forward(self, fields: torch.Tensor) -> torch.Tensor:
        b, n, _ = fields.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in self.qkv(fields).chunk(3, dim=-1))
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return F.relu(attended + self.residual(fields))


class AutoInt(CRM):
    name = "autoint"

    def __init__(self, spec, cfg, tables=None):
        super().__init__(spec, cfg, tables)
        a = cfg.autoint
        if a.attention_size % a.heads:
            raise ConfigError(f"crm.autoint.heads: {a.heads} does not divide attention_size {a.attention_size}")
        widths = [cfg.embed_dim] + [a.attention_size] * a.attention_layers
        self.layers = nn.ModuleList(InteractingLayer(i, o, a.heads) for i, o in zip(widths, widths[1:]))
        self._build_head(self.embedding.n_fields * widths[-1])

    def represent(self, batch: Batch) -> torch.Tensor:
        fields = self.embedding.fields(batch)
        for layer in self.layers:
            fields = layer(fields)
        return self.dropout(fields.flatten(1))
