"""RecLoRA as one module: the frozen LLM with its adapter, and the frozen CRM whose R_c drives
the personalized-LoRA gate. Tuning, batch scoring and the online service all build it here."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from reclora_ray.config import Config
from reclora_ray.llm.variants import Variant, crm_name
from reclora_ray.rundir import RunDir

log = logging.getLogger(__name__)


class RecLoRAModel(nn.Module):
    """forward(prompt tokens, CRM features) -> the LLM's output; R_c is computed on the fly from
    the long history by the frozen CRM (no gradient), then routed to the gate."""

    def __init__(self, llm: nn.Module, crm: nn.Module | None = None):
        super().__init__()
        self.llm = llm
        self.crm = crm
        if crm is not None:
            crm.eval()
            crm.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.crm is not None:
            self.crm.eval()  # frozen: no dropout while the adapter trains
        return self

    def crm_repr(self, crm_features: dict | None) -> torch.Tensor | None:
        if self.crm is None:
            return None
        if crm_features is None:
            raise ValueError("this model's gate reads R_c: pass crm_features for every sample")
        with torch.no_grad():
            return self.crm.represent(crm_features)

    def forward(self, input_ids, attention_mask, position_ids=None, labels=None, crm_features=None, **kwargs):
        if self.crm is not None:
            kwargs["crm_repr"] = self.crm_repr(crm_features)
        return self.llm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        labels=labels, **kwargs)

    @torch.no_grad()
    def last_logits(self, input_ids, attention_mask, position_ids=None, crm_features=None) -> torch.Tensor:
        """Vocabulary logits at the last position only (the answer slot of a left-padded batch)."""
        out = self.forward(input_ids, attention_mask, position_ids, crm_features=crm_features, logits_to_keep=1)
        return out.logits[:, -1, :]

    @torch.no_grad()
    def gate_weights(self, crm_features: dict) -> torch.Tensor:
        """alpha (batch, N_m) of the personalized LoRA for these samples."""
        from reclora_ray.llm.plora import unwrap

        return unwrap(self.llm).gate_weights(self.crm_repr(crm_features))


def build_model(cfg: Config, run: RunDir, variant: Variant, adapter_dir: Path | None = None,
                device: torch.device | str = "cpu"):
    """(RecLoRAModel, tokenizer, CRM feature spec or None): the base LLM, with a fresh adapter or
    the one in adapter_dir, and the frozen CRM when the variant's gate reads R_c."""
    from reclora_ray.crm import load_crm
    from reclora_ray.llm.base import load_base
    from reclora_ray.llm.plora import PersonalizedLoRAModel, load_adapter

    base, tokenizer = load_base(cfg.llm, device=device)
    crm = None
    if variant.uses_crm:
        crm = load_crm(run.crm(crm_name(cfg, variant)), device=str(device))
    if variant.adapter is None:
        base.requires_grad_(False)
        llm = base
    elif adapter_dir is not None:
        llm = load_adapter(base, adapter_dir)
    else:
        llm = PersonalizedLoRAModel(base, variant.lora_config(cfg.lora), crm_dim=crm.d_c if crm else 0)
    model = RecLoRAModel(llm, crm)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("%s: %s + %s, %d trainable parameters", variant.name, cfg.llm.model,
             f"CRM {crm_name(cfg, variant)}" if crm else "no CRM", n_train)
    return model, tokenizer, (crm.spec if crm else None)
