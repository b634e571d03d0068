"""Samples -> what the model reads: prompt tokens (Figure 2) and the CRM's ID features.

The one place where a sample becomes model input. Tuning, batch scoring and the online
service all call it, so one sample gets one prompt and one R_c on every path.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import pandas as pd
import torch

from reclora_ray.config import Config
from reclora_ray.data.prepared import PreparedData
from reclora_ray.llm.base import use_chat_template
from reclora_ray.llm.collate import PromptCollator, length_buckets
from reclora_ray.llm.histories import Histories, sample_histories
from reclora_ray.llm.prompt import PromptBuilder
from reclora_ray.variants import Variant


class InputBuilder:
    def __init__(self, cfg: Config, data: PreparedData, variant: Variant, tokenizer, crm_spec=None):
        if variant.uses_crm and crm_spec is None:
            raise ValueError(f"variant {variant.name!r} reads R_c: its CRM's feature spec is needed")
        self.variant = variant
        self.sequences = data.sequences
        self.k_short, self.k_long = cfg.retrieve.k_short, cfg.retrieve.k_long
        self.prompts = PromptBuilder.from_prepared(data, tokenizer, use_chat_template(cfg.llm, tokenizer))
        self.collator = PromptCollator(tokenizer, cfg.llm.max_length)
        self.features = None
        if variant.uses_crm:
            from reclora_ray.crm.features import FeatureEncoder

            self.features = FeatureEncoder(crm_spec)

    def histories(self, rows: pd.DataFrame) -> Histories:
        return sample_histories(self.sequences, rows, self.variant, self.k_short, self.k_long)

    def prompt_ids(self, user_ids, item_ids, hist: Histories) -> list[list[int]]:
        texts = self.prompts.prompts(user_ids, item_ids, hist.short_items, hist.short_ratings)
        return self.collator.encode(texts)

    def crm_features(self, user_ids, item_ids, timestamps, hist: Histories) -> dict[str, torch.Tensor] | None:
        if self.features is None:
            return None
        batch = self.features.encode(user_ids, item_ids, timestamps, hist.long_items, hist.long_ratings)
        return {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in batch.items()}

    def training_batch(self, rows: pd.DataFrame) -> dict:
        """Prompt + answer tokens, loss on the answer only, and the CRM features."""
        users, items = rows["user_id"].to_numpy(), rows["item_id"].to_numpy()
        hist = self.histories(rows)
        batch = self.collator.training_batch(self.prompt_ids(users, items, hist), rows["label"].to_numpy())
        batch["crm_features"] = self.crm_features(users, items, rows["timestamp"].to_numpy(), hist)
        return batch

    def scoring_batches(
        self, user_ids, item_ids, timestamps, hist: Histories, batch_size: int
    ) -> Iterator[tuple[np.ndarray, dict]]:
        """(row indices, batch) over length-bucketed groups: each padded batch wastes little."""
        user_ids, item_ids, timestamps = map(np.asarray, (user_ids, item_ids, timestamps))
        prompt_ids = self.prompt_ids(user_ids, item_ids, hist)
        for index in length_buckets([len(p) for p in prompt_ids], batch_size):
            batch = self.collator.scoring_batch([prompt_ids[i] for i in index])
            batch["crm_features"] = self.crm_features(
                user_ids[index], item_ids[index], timestamps[index], hist.take(index)
            )
            yield index, batch


def to_device(batch: dict, device) -> dict:
    """Tensors (also inside nested dicts, e.g. crm_features) moved to `device`; None stays None."""
    return {
        key: to_device(value, device)
        if isinstance(value, dict)
        else value.to(device)
        if isinstance(value, torch.Tensor)
        else value
        for key, value in batch.items()
    }
