"""DeepFM (Guo et al., IJCAI 2017) over all fields (the history average-pooled into extra fields):
a first-order term, the FM pairwise-interaction vector and a DNN share the embeddings.
R_c = [first order, FM interaction vector, DNN output]."""

from __future__ import annotations

import torch
from torch import nn

from reclora_ray.crm.models.base import CRM, MLP, Batch


class DeepFM(CRM):
    name = "deepfm"

    def __init__(self, spec, cfg, tables=None):
        super().__init__(spec, cfg, tables)
        flat = self.embedding.n_fields * cfg.embed_dim
        self.first_order = nn.Linear(flat, 1)
        self.dnn = MLP(flat, cfg.deepfm.dnn_hidden, cfg.dropout)
        self._build_head(1 + cfg.embed_dim + self.dnn.d_out)

    def represent(self, batch: Batch) -> torch.Tensor:
        fields = self.embedding.fields(batch)
        interaction = 0.5 * (fields.sum(1).pow(2) - fields.pow(2).sum(1))
        flat = fields.flatten(1)
        return torch.cat([self.first_order(flat), interaction, self.dnn(flat)], dim=1)
