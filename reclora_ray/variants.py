"""The LLM-based models the paper compares (Table 2, Table 3) as data, not code paths.

A variant fixes which adapter the LLM gets, whether the frozen CRM drives a gate, and how the
long (ID) and short (text) histories are chosen. Tuning, scoring and serving all read it here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from reclora_ray.config import Config, CRMConfig, LoRAConfig, TuneConfig

HistoryMode = Literal["semantic", "recent"]


@dataclass(frozen=True)
class Variant:
    name: str
    adapter: Optional[Literal["plora", "lora", "lora_same_params"]]  # None: the frozen base LLM
    short_mode: HistoryMode  # the text history in the prompt
    long_mode: HistoryMode  # the ID history the CRM reads (only when the adapter is plora)
    description: str
    # A method's own settings over the config's: its LoRA shape (lora.* keys), the CRM its gate
    # reads (crm.model) and its learning rate (tune.lr). None / empty: the config's.
    lora: dict[str, Any] = field(default_factory=dict, hash=False)
    crm_model: Optional[str] = None
    lr: Optional[float] = None

    @property
    def uses_crm(self) -> bool:
        """Only the personalized LoRA reads R_c: its gate is what the CRM drives."""
        return self.adapter == "plora"

    @property
    def needs_retrieval(self) -> bool:
        """Whether any history it reads is the retrieved (semantic) one."""
        return self.short_mode == "semantic" or (self.uses_crm and self.long_mode == "semantic")

    @property
    def crm_history(self) -> Literal["long", "recent"]:
        return "long" if self.long_mode == "semantic" else "recent"

    def lora_config(self, base: LoRAConfig) -> LoRAConfig:
        if self.adapter is None:
            raise ValueError(f"variant {self.name!r} has no adapter")
        return dataclasses.replace(base, variant=self.adapter, **self.lora)

    def tune_config(self, base: TuneConfig) -> TuneConfig:
        return base if self.lr is None else dataclasses.replace(base, lr=self.lr)


ILORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant("zero-shot", None, "semantic", "semantic", "the frozen base LLM, ReLLa-style prompt"),
        Variant("tallrec", "lora", "recent", "semantic", "TALLRec: LoRA r, recent history in text"),
        Variant("rella", "lora", "semantic", "semantic", "ReLLa: LoRA r, retrieved history in text"),
        Variant("reclora", "plora", "semantic", "semantic", "RecLoRA: personalized LoRA + CRM gate"),
        Variant(
            "wo-meta-lora",
            "lora",
            "semantic",
            "semantic",
            "Table 3: a single LoRA of rank r instead of the meta-LoRA bank",
        ),
        Variant(
            "wo-meta-lora-same-params",
            "lora_same_params",
            "semantic",
            "semantic",
            "Table 3: a single LoRA of rank N_m*r (same parameter count)",
        ),
        Variant(
            "wo-long-retriever",
            "plora",
            "semantic",
            "recent",
            "Table 3: the CRM reads the recent history instead of the retrieved long list",
        ),
        Variant(
            "wo-short-retriever",
            "plora",
            "recent",
            "semantic",
            "Table 3: the prompt holds the recent history instead of the retrieved short list",
        ),
        Variant("wo-both-retrievers", "plora", "recent", "recent", "Table 3: recent histories only"),
        # iLoRA (Kong et al., 2024): one LoRA of rank 8 on every attention and MLP projection, split
        # into N = 4 experts of rank 2, mixed at the output by one gate fed by the frozen SASRec's
        # representation of the recent sequence. Its scaling alpha / r = 32 / 8 (the whole LoRA's
        # rank) is our alpha / (rank per expert) = 8 / 2.
        Variant(
            "ilora",
            "plora",
            "recent",
            "recent",
            "iLoRA: 4 LoRA experts of rank 2 on all projections, gate fed by SASRec's R_c",
            lora={
                "r": 2,
                "n_meta": 4,
                "alpha": 8,
                "mixing": "paper",
                "gate": "shared",
                "temperature": 1.0,
                "target_modules": list(ILORA_TARGETS),
                "gate_input": "head_input",  # SASRec's sequence representation itself
            },
            crm_model="sasrec",
            lr=8e-4,
        ),
    ]
}


def get_variant(name: str) -> Variant:
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    return VARIANTS[name]


def crm_config(cfg: Config, variant: Variant) -> CRMConfig:
    """The CRM a variant's gate reads: its own model or the configured one, on its long history."""
    return dataclasses.replace(cfg.crm, history=variant.crm_history, model=variant.crm_model or cfg.crm.model)


def crm_name(cfg: Config, variant: Variant) -> str:
    """Its checkpoint: OUT/crm/<model> or OUT/crm/<model>-recent."""
    return crm_config(cfg, variant).output_name
