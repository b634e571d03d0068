"""SASRec (Kang & McAuley, ICDM 2018): causal self-attention over the behaviours with learned
position embeddings; the output at the most recent behaviour is the user's interest.
R_c = [profile, interest]."""

from __future__ import annotations

import torch
from torch import nn

from reclora_ray.config import ConfigError
from reclora_ray.crm.models.base import CRM, Batch, right_align


class SASRec(CRM):
    name = "sasrec"

    def __init__(self, spec, cfg, tables=None):
        super().__init__(spec, cfg, tables)
        s = cfg.sasrec
        if s.attention_size % s.heads:
            raise ConfigError(f"crm.sasrec.heads: {s.heads} does not divide attention_size {s.attention_size}")
        self.project = nn.Linear(self.embedding.item_dim, s.attention_size)
        self.position = nn.Embedding(spec.history_len, s.attention_size)
        layer = nn.TransformerEncoderLayer(
            s.attention_size,
            s.heads,
            dim_feedforward=s.attention_size,
            dropout=cfg.dropout,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, s.attention_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(s.attention_size)
        causal = torch.triu(torch.ones(spec.history_len, spec.history_len, dtype=torch.bool), diagonal=1)
        self.register_buffer("causal", causal, persistent=False)
        self._build_head(self.embedding.profile_dim + s.attention_size)

    def represent(self, batch: Batch) -> torch.Tensor:
        behaviours, mask = self.embedding.history(batch)
        sequence, lengths = right_align(behaviours.flatten(-2), mask)
        k = sequence.shape[1]
        positions = torch.arange(k, device=sequence.device)
        padding = positions[None, :] >= lengths.clamp(min=1)[:, None]  # an empty history keeps one slot
        hidden = self.project(sequence) + self.position(positions)
        hidden = self.norm(self.encoder(hidden, mask=self.causal, src_key_padding_mask=padding))
        last = hidden[torch.arange(len(lengths)), (lengths - 1).clamp(min=0)]
        last = last.masked_fill((lengths == 0)[:, None], 0.0)
        return torch.cat([self.embedding.profile(batch), last], dim=1)
