"""Per-sample LLM inputs for one variant: the prompt text and the CRM's long ID history.

Input rows are samples (user_id, item_id, pos, ...) with the retrieval columns hist_long /
hist_short when a variant uses semantic histories. The same builder serves tuning, batch
scoring and the online service, so one sample always gets one prompt and one R_c.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from reclora_ray.config import Config
from reclora_ray.data.prepared import PreparedData
from reclora_ray.llm.histories import HistoryBatch, history_batch
from reclora_ray.llm.prompt import PromptBuilder
from reclora_ray.llm.variants import Variant


@dataclass
class Examples:
    prompts: list[str]
    long_history: HistoryBatch | None  # what the CRM reads; None when the variant has no gate


class ExampleBuilder:
    def __init__(self, cfg: Config, data: PreparedData, variant: Variant, tokenizer=None):
        self.cfg = cfg
        self.data = data
        self.variant = variant
        self.prompts = PromptBuilder(data, chat_template=cfg.llm.chat_template, tokenizer=tokenizer)

    def short_history(self, rows: pd.DataFrame) -> HistoryBatch:
        return history_batch(
            self.data.sequences, rows["user_id"].to_numpy(), rows["pos"].to_numpy(),
            self.cfg.retrieve.k_short, self.variant.short_mode,
            rows["hist_short"].to_numpy() if "hist_short" in rows else None,
        )

    def long_history(self, rows: pd.DataFrame) -> HistoryBatch:
        return history_batch(
            self.data.sequences, rows["user_id"].to_numpy(), rows["pos"].to_numpy(),
            self.cfg.retrieve.k_long, self.variant.long_mode,
            rows["hist_long"].to_numpy() if "hist_long" in rows else None,
        )

    def build(self, rows: pd.DataFrame) -> Examples:
        short = self.short_history(rows)
        users = rows["user_id"].to_numpy()
        items = rows["item_id"].to_numpy()
        prompts = [
            self.prompts.build(int(users[i]), *short.row(i), int(items[i])) for i in range(len(rows))
        ]
        long = self.long_history(rows) if self.variant.uses_crm else None
        return Examples(prompts, long)


def needs_retrieval(variant: Variant) -> bool:
    return variant.short_mode == "semantic" or (variant.uses_crm and variant.long_mode == "semantic")


def few_shot_sample(train: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """The paper's few-shot set: n training samples drawn uniformly without replacement, fixed
    by the seed (the whole split when n exceeds it)."""
    if n >= len(train):
        return train.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(train), size=n, replace=False))
    return train.iloc[keep].reset_index(drop=True)
