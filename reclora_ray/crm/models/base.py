"""What every CRM shares: the field embeddings, the MLP head, and the forward/represent split.

A CRM is `represent(batch) -> R_c (B, d_c)` (the model-specific body) followed by the shared head
`MLP(R_c) -> logit`; R_c is what the personalized-LoRA gate reads.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from reclora_ray.config import CRMConfig
from reclora_ray.crm.features import FeatureSpec

Batch = dict[str, torch.Tensor]


def _offsets(sizes: list[int]) -> torch.Tensor:
    return torch.tensor(np.concatenate([[0], np.cumsum(sizes)[:-1]]), dtype=torch.long)


class FeatureEmbedding(nn.Module):
    """Embeds the batch of `features.FeatureEncoder` into per-field vectors of width embed_dim.

    User profile and item attributes are looked up from tables held as buffers (so they travel
    in the checkpoint). An item is n_item_fields vectors: item_id, each scalar field, and the
    mean of each bag (genres). A history behaviour is its item's vectors plus its rating's.
    """

    def __init__(self, spec: FeatureSpec, embed_dim: int, tables: dict[str, np.ndarray] | None = None):
        super().__init__()
        self.embed_dim = embed_dim
        self.bag_names = list(spec.item_bags)
        user_sizes = list(spec.user_fields.values())
        item_sizes = list(spec.item_fields.values())
        bag_sizes = [size for size, _ in spec.item_bags.values()]
        context_sizes = list(spec.context_fields.values())

        self.user_embedding = nn.Embedding(sum(user_sizes), embed_dim)
        self.item_embedding = nn.Embedding(sum(item_sizes) + sum(bag_sizes), embed_dim)
        self.context_embedding = nn.Embedding(sum(context_sizes), embed_dim)
        self.rating_embedding = nn.Embedding(spec.rating_buckets, embed_dim, padding_idx=0)
        self.register_buffer("user_offsets", _offsets(user_sizes), persistent=False)
        self.register_buffer("item_offsets", _offsets(item_sizes), persistent=False)
        self.register_buffer("context_offsets", _offsets(context_sizes), persistent=False)
        bag_starts = sum(item_sizes) + _offsets(bag_sizes)
        self.register_buffer("bag_offsets", bag_starts, persistent=False)

        def table(name: str, shape: tuple[int, int]) -> torch.Tensor:
            if tables is None:  # filled by load_state_dict
                return torch.zeros(shape, dtype=torch.long)
            return torch.tensor(tables[name], dtype=torch.long)  # a copy: Ray hands out read-only arrays

        self.register_buffer("user_table", table("user_table", (spec.n_users + 1, len(user_sizes))))
        self.register_buffer("item_table", table("item_table", (spec.n_items + 1, len(item_sizes))))
        for name, (_, width) in spec.item_bags.items():
            self.register_buffer(f"bag_{name}", table(f"bag_{name}", (spec.n_items + 1, width)))

        self.n_user_fields = len(user_sizes)
        self.n_item_fields = len(item_sizes) + len(bag_sizes)
        self.n_context_fields = len(context_sizes)
        nn.init.normal_(self.user_embedding.weight, std=0.01)
        nn.init.normal_(self.item_embedding.weight, std=0.01)
        nn.init.normal_(self.context_embedding.weight, std=0.01)
        nn.init.normal_(self.rating_embedding.weight, std=0.01)

    @property
    def item_dim(self) -> int:
        """Width of one item (or behaviour) as a flat vector."""
        return self.n_item_fields * self.embed_dim

    @property
    def n_fields(self) -> int:
        """Fields of `fields()`: user, target item, context and the pooled history item fields."""
        return self.n_user_fields + 2 * self.n_item_fields + self.n_context_fields

    @property
    def profile_dim(self) -> int:
        """Width of `profile()`."""
        return (self.n_user_fields + self.n_item_fields + self.n_context_fields) * self.embed_dim

    def users(self, batch: Batch) -> torch.Tensor:
        return self.user_embedding(self.user_table[batch["user"]] + self.user_offsets)

    def items(self, codes: torch.Tensor) -> torch.Tensor:
        """Item codes of any shape (...) -> (..., n_item_fields, embed_dim)."""
        # A batch of histories repeats few distinct items: embed each once (bags are costly).
        unique, inverse = torch.unique(codes, return_inverse=True)
        return self._item_fields(unique)[inverse]

    def _item_fields(self, codes: torch.Tensor) -> torch.Tensor:
        fields = [self.item_embedding(self.item_table[codes] + self.item_offsets)]
        for i, name in enumerate(self.bag_names):
            bag = getattr(self, f"bag_{name}")[codes]
            present = (bag > 0).unsqueeze(-1).float()
            vectors = self.item_embedding(bag + self.bag_offsets[i]) * present
            fields.append((vectors.sum(-2) / present.sum(-2).clamp(min=1)).unsqueeze(-2))
        return torch.cat(fields, dim=-2)

    def context(self, batch: Batch) -> torch.Tensor:
        return self.context_embedding(batch["context"] + self.context_offsets)

    def target(self, batch: Batch) -> torch.Tensor:
        """The target item as a flat vector (B, item_dim)."""
        return self.items(batch["item"]).flatten(-2)

    def history(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Behaviours (B, K, n_item_fields, embed_dim) and their mask (B, K), True = present."""
        mask = batch["hist_item"] > 0
        behaviours = self.items(batch["hist_item"]) + self.rating_embedding(batch["hist_rating"]).unsqueeze(-2)
        return behaviours * mask[..., None, None], mask

    def profile(self, batch: Batch) -> torch.Tensor:
        """User fields, target item and context, flat (B, profile_dim): the non-history part of R_c."""
        parts = [self.users(batch), self.items(batch["item"]), self.context(batch)]
        return torch.cat(parts, dim=1).flatten(1)

    def fields(self, batch: Batch) -> torch.Tensor:
        """All fields for the feature-interaction models (B, n_fields, embed_dim); the history is
        average-pooled per item field (paper, Appendix B)."""
        behaviours, mask = self.history(batch)
        pooled = behaviours.sum(1) / mask.sum(1).clamp(min=1)[:, None, None]
        return torch.cat([self.users(batch), self.items(batch["item"]), self.context(batch), pooled], dim=1)


class MLP(nn.Sequential):
    """Linear -> ReLU -> Dropout per hidden width; `out` adds a final Linear."""

    def __init__(self, d_in: int, hidden: list[int], dropout: float, out: int | None = None):
        layers: list[nn.Module] = []
        for width in hidden:
            layers += [nn.Linear(d_in, width), nn.ReLU(), nn.Dropout(dropout)]
            d_in = width
        if out is not None:
            layers.append(nn.Linear(d_in, out))
        super().__init__(*layers)
        self.d_out = out if out is not None else d_in

    def last_hidden(self, x: torch.Tensor) -> torch.Tensor:
        """Every layer but the output Linear (of an MLP built with `out`): its last hidden layer."""
        for layer in list(self)[:-1]:
            x = layer(x)
        return x


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """values (B, K, D), mask (B, K) -> (B, D); zero where the mask is empty."""
    weights = mask.unsqueeze(-1).float()
    return (values * weights).sum(1) / weights.sum(1).clamp(min=1)


def recent_mean(values: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of the last n present entries of a left-padded, chronological (B, K, D) history."""
    return masked_mean(values[:, -n:], mask[:, -n:])


def right_align(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (B, K, ...) -> right-padded, plus lengths (B,): for RNNs and causal attention."""
    lengths = mask.sum(1)
    k = mask.shape[1]
    index = (torch.arange(k, device=mask.device)[None, :] + (k - lengths)[:, None]) % k
    gather_index = index.view(*index.shape, *([1] * (values.dim() - 2))).expand_as(values)
    return values.gather(1, gather_index), lengths


class CRM(nn.Module):
    """Base class: subclasses build their body in __init__, call `_build_head(d_c)`, and
    implement `represent`."""

    name: str = ""

    def __init__(self, spec: FeatureSpec, cfg: CRMConfig, tables: dict[str, np.ndarray] | None = None):
        super().__init__()
        self.spec = spec
        self.cfg = cfg
        self.embedding = FeatureEmbedding(spec, cfg.embed_dim, tables)
        self.dropout = nn.Dropout(cfg.dropout)

    def _build_head(self, d_c: int) -> None:
        self.d_c = d_c
        self.head = MLP(d_c, self.cfg.mlp_hidden, self.cfg.dropout, out=1)

    def represent(self, batch: Batch) -> torch.Tensor:
        """R_c (B, d_c): the hidden vector the head reads."""
        raise NotImplementedError

    def representation(self, batch: Batch, layer: str = "head_input") -> torch.Tensor:
        """What a gate reads (`lora.gate_input`): `represent`, or the head's last hidden layer
        (every layer of the head but its output Linear)."""
        self.representation_dim(layer)  # checks the layer
        rep = self.represent(batch)
        return rep if layer == "head_input" else self.head.last_hidden(rep)

    def representation_dim(self, layer: str = "head_input") -> int:
        if layer == "head_input":
            return self.d_c
        if layer != "last_hidden":
            raise ValueError(f"lora.gate_input: {layer!r} is not 'head_input' or 'last_hidden'")
        if not self.cfg.mlp_hidden:
            raise ValueError(
                "lora.gate_input: last_hidden needs a CRM head with hidden layers (crm.mlp_hidden is empty)"
            )
        return self.cfg.mlp_hidden[-1]

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.head(self.represent(batch)).squeeze(-1)


def attention_pool(
    attention: nn.MultiheadAttention, query: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Target attention (B, D) over (B, K, D) with a padding mask; rows with no key give zeros."""
    empty = ~mask.any(1)
    key_padding = ~mask.clone()
    key_padding[empty, -1] = False  # one dummy key keeps softmax finite; zeroed below
    out, _ = attention(query.unsqueeze(1), keys, keys, key_padding_mask=key_padding, need_weights=False)
    return out.squeeze(1).masked_fill(empty[:, None], 0.0)
