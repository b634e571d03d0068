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
    def __init__(self, llm: nn.Module, crm: nn.Module | None = None):
        super().__init__()
        self.llm = llm
        self.crm = crm
        if crm is not None:
            crm.eval()
            crm.requires_grad_(False)

    def crm_repr(self, crm_batch: dict | None) -> torch.Tensor | None:
        if self.crm is None:
            return None
        if crm_batch is None:
            raise ValueError("this model's gate needs CRM features (crm_batch) for every sample")
        with torch.no_grad():
            return self.crm.represent(crm_batch)

    def forward(self, input_ids, attention_mask, position_ids=None, labels=None, crm_batch=None, **kwargs):
        kwargs = dict(kwargs, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        if labels is not None:
            kwargs["labels"] = labels
        if self.crm is not None:
            kwargs["crm_repr"] = self.crm_repr(crm_batch)
        return self.llm(**kwargs)

    @torch.no_grad()
    def last_logits(self, input_ids, attention_mask, position_ids, crm_batch=None) -> torch.Tensor:
        """Vocabulary logits at the last position only (the answer slot of a left-padded batch)."""
        out = self.forward(input_ids, attention_mask, position_ids, crm_batch=crm_batch, logits_to_keep=1)
        return out.logits[:, -1, :]


def build_model(cfg: Config, run: RunDir, variant: Variant, adapter_dir: Path | None = None,
                device: torch.device | str = "cpu"):
    """Base LLM (+ adapter: fresh, or loaded from adapter_dir) (+ frozen CRM) and the tokenizer,
    with the CRM's feature encoder when the variant reads R_c."""
    from reclora_ray.llm import plora
    from reclora_ray.llm.base import load_base

    base, tokenizer = load_base(cfg.llm, device=device)
    base.requires_grad_(False)
    crm = encoder = None
    if variant.uses_crm:
        from reclora_ray.crm import load_crm

        crm, encoder = load_crm(run.crm(crm_name(cfg, variant)))
        crm.to(device)
    if variant.adapter is None:
        llm = base
    elif adapter_dir is not None:
        llm = plora.load_adapter(base, adapter_dir)
    else:
        llm = plora.wrap_model(base, variant.lora_config(cfg.lora), crm_dim=crm.output_dim if crm else None)
    llm.to(device)
    return RecLoRAModel(llm, crm), tokenizer, encoder
