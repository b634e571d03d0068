"""DCN-V2 (Wang et al., WWW 2021), parallel form, over all fields (the history average-pooled
into extra fields): full-rank cross layers x_{l+1} = x_0 * (W_l x_l + b_l) + x_l beside a DNN.
R_c = [cross network output, DNN output]."""

from __future__ import annotations

import torch
from torch import nn

from reclora_ray.crm.models.base import CRM, MLP, Batch


class DCNv2(CRM):
    name = "dcnv2"

    def __init__(self, spec, cfg, tables=None):
        super().__init__(spec, cfg, tables)
        flat = self.embedding.n_fields * cfg.embed_dim
        self.cross = nn.ModuleList(nn.Linear(flat, flat) for _ in range(cfg.dcnv2.cross_layers))
        self.dnn = MLP(flat, cfg.dcnv2.dnn_hidden, cfg.dropout)
        self._build_head(flat + self.dnn.d_out)

    def represent(self, batch: Batch) -> torch.Tensor:
        x0 = self.embedding.fields(batch).flatten(1)
        x = x0
        for layer in self.cross:
            x = x0 * layer(x) + x
        return torch.cat([x, self.dnn(x0)], dim=1)
