"""GRU4Rec (Hidasi et al., ICLR 2016): a GRU reads the behaviours in time order; its last hidden
state is the user's interest. R_c = [profile, last hidden state]."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from reclora_ray.crm.models.base import CRM, Batch, right_align


class GRU4Rec(CRM):
    name = "gru4rec"

    def __init__(self, spec, cfg, tables=None):
        super().__init__(spec, cfg, tables)
        g = cfg.gru4rec
        self.gru = nn.GRU(
            self.embedding.item_dim,
            g.gru_hidden,
            num_layers=g.gru_layers,
            batch_first=True,
            dropout=cfg.dropout if g.gru_layers > 1 else 0.0,
        )
        self._build_head(self.embedding.profile_dim + g.gru_hidden)

    def represent(self, batch: Batch) -> torch.Tensor:
        behaviours, mask = self.embedding.history(batch)
        sequence, lengths = right_align(behaviours.flatten(-2), mask)
        packed = pack_padded_sequence(sequence, lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False)
        _, hidden = self.gru(packed)
        last = hidden[-1].masked_fill((lengths == 0)[:, None], 0.0)
        return torch.cat([self.embedding.profile(batch), last], dim=1)
