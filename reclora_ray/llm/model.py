"""RecLoRA as one module: the frozen LLM with its adapter, and the frozen CRM whose R_c drives
the personalized-LoRA gate. Tuning, batch scoring and the online service all build it here."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from reclora_ray.config import Config
from reclora_ray.rundir import RunDir
from reclora_ray.variants import Variant, crm_name

log = logging.getLogger(__name__)


# What a forward needs to return only the final hidden states: the vocabulary logits at one
# position (HF computes at least one), no key/value cache. The position is given as an index
# tensor, not as logits_to_keep=1: HF's slice hidden[:, -1:] is a strided (batch, 1, d) view,
# which F.linear cannot fold into one matmul, so it broadcasts the (vocab, d) head to a
# (batch, d, vocab) copy (1.4 s of a 4.9 s bf16 training step of SmolLM2 on CPU); an index
# gathers a contiguous (batch, 1, d) instead.
def last_positions(n: int) -> torch.Tensor:
    """`logits_to_keep` for the last n positions, as indices (see HIDDEN_ONLY)."""
    return torch.arange(-n, 0)


HIDDEN_ONLY = {"output_hidden_states": True, "logits_to_keep": last_positions(1), "use_cache": False}


def causal_lm(llm: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside a DeepSpeed engine and/or a PersonalizedLoRAModel."""
    from reclora_ray.llm.plora import PersonalizedLoRAModel

    while hasattr(llm, "module"):
        llm = llm.module
    return llm.base_model if isinstance(llm, PersonalizedLoRAModel) else llm


def answer_scores(llm: nn.Module, hidden: torch.Tensor, answer_ids: tuple[int, int]) -> torch.Tensor:
    """(batch, 2) fp32 scores (s_yes, s_no) from final hidden states (batch, d).

    Computed in fp32 from the two rows of the output embedding: bf16 vocabulary logits are
    too coarse (at a logit of ~24 the bf16 step is 0.125), and only these two matter."""
    head = causal_lm(llm).get_output_embeddings()
    rows = head.weight[list(answer_ids)].float()
    scores = hidden.float() @ rows.T
    if getattr(head, "bias", None) is not None:
        scores = scores + head.bias[list(answer_ids)].float()
    cap = getattr(causal_lm(llm).config, "final_logit_softcapping", None)
    if cap:
        scores = torch.tanh(scores / cap) * cap
    return scores


def training_loss(
    llm: nn.Module, batch: dict, crm_repr: torch.Tensor | None, kind: str, answer_ids: tuple[int, int]
) -> torch.Tensor:
    """The tuning loss of a left-padded prompt + answer batch (labels only on the answer tokens).

    "lm": the language-model cross-entropy on the answer tokens, as the paper trains; the
    vocabulary head runs on the answer positions only (answers are right-aligned), not on every
    prompt token. "yes_no": the two-way cross-entropy of softmax(s_yes, s_no) at the answer
    slot, the quantity scoring reads. `llm` may be a DeepSpeed engine: its forward is used."""
    from torch.nn import functional as F

    from reclora_ray.llm.collate import IGNORE_INDEX

    labels = batch["labels"]
    kwargs = {"crm_repr": crm_repr} if crm_repr is not None else {}
    out = llm(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch.get("position_ids"),
        **kwargs,
        **HIDDEN_ONLY,
    )
    hidden = out.hidden_states[-1]
    answer = labels != IGNORE_INDEX
    span = int(answer.sum(dim=1).max())
    if not bool(answer[:, -span:].sum() == answer.sum()):
        raise ValueError("answer labels must be right-aligned (a left-padded batch)")
    if kind == "lm":
        # The answer positions as one contiguous (batch * span, d) matrix (a strided 3-d slice
        # would copy the head per row, see HIDDEN_ONLY), through the head in fp32 like the scores.
        head = causal_lm(llm).get_output_embeddings()
        slots = hidden[:, -span - 1 : -1].reshape(-1, hidden.shape[-1]).float()
        bias = head.bias.float() if getattr(head, "bias", None) is not None else None
        logits = F.linear(slots, head.weight.float(), bias)
        return F.cross_entropy(logits, labels[:, -span:].flatten(), ignore_index=IGNORE_INDEX)
    if kind == "yes_no":
        first = answer.int().argmax(dim=1)  # first answer token of each row; its slot is one before
        rows = torch.arange(len(labels), device=labels.device)
        scores = answer_scores(llm, hidden[rows, first - 1], answer_ids)
        target = (labels[rows, first] != answer_ids[0]).long()  # index 0: yes, 1: no
        return F.cross_entropy(scores, target)
    raise ValueError(f"unknown tune.loss {kind!r}: lm or yes_no")


class RecLoRAModel(nn.Module):
    """forward(prompt tokens, CRM features) -> the LLM's output; R_c is computed on the fly from
    the long history by the frozen CRM (no gradient), then routed to the gate."""

    def __init__(self, llm: nn.Module, crm: nn.Module | None = None):
        super().__init__()
        self.llm = llm
        self.crm = crm
        self.gate_input = "head_input"  # the CRM layer the gate reads: its adapter's lora.gate_input
        if crm is not None:
            from reclora_ray.llm.plora import unwrap

            self.gate_input = unwrap(llm).lora_config.gate_input
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
            return self.crm.representation(crm_features, self.gate_input)

    def forward(self, input_ids, attention_mask, position_ids=None, labels=None, crm_features=None, **kwargs):
        if self.crm is not None:
            kwargs["crm_repr"] = self.crm_repr(crm_features)
        return self.llm(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels, **kwargs
        )

    @torch.no_grad()
    def answer_scores(
        self, input_ids, attention_mask, answer_ids: tuple[int, int], position_ids=None, crm_features=None
    ) -> torch.Tensor:
        """(s_yes, s_no) at the last position (the answer slot of a left-padded batch), fp32."""
        hidden = self._final_hidden(input_ids, attention_mask, position_ids, crm_features)
        return answer_scores(self.llm, hidden[:, -1], answer_ids)

    def _final_hidden(self, input_ids, attention_mask, position_ids, crm_features) -> torch.Tensor:
        out = self.forward(input_ids, attention_mask, position_ids, crm_features=crm_features, **HIDDEN_ONLY)
        return out.hidden_states[-1]

    @torch.no_grad()
    def gate_weights(self, crm_features: dict) -> torch.Tensor:
        """alpha (batch, N_m) of the personalized LoRA for these samples."""
        from reclora_ray.llm.plora import unwrap

        return unwrap(self.llm).gate_weights(self.crm_repr(crm_features))


def build_model(
    cfg: Config, run: RunDir, variant: Variant, adapter_dir: Path | None = None, device: torch.device | str = "cpu"
):
    """(RecLoRAModel, tokenizer, CRM feature spec or None): the base LLM, with a fresh adapter or
    the one in adapter_dir, and the frozen CRM when the variant's gate reads R_c."""
    from reclora_ray.base_model import dtype_name, load_base, resolve_dtype
    from reclora_ray.crm import load_crm
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
        lora = variant.lora_config(cfg.lora)
        llm = PersonalizedLoRAModel(base, lora, crm_dim=crm.representation_dim(lora.gate_input) if crm else 0)
    model = RecLoRAModel(llm, crm)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dtype = dtype_name(resolve_dtype(cfg.llm.dtype, torch.device(device)))
    log.info(
        "%s: %s (%s%s%s) on %s + %s, %s trainable parameters",
        variant.name,
        cfg.llm.model,
        dtype,
        ", llm.dtype auto" if cfg.llm.dtype == "auto" else "",
        ", 8-bit" if cfg.llm.load_in_8bit else "",
        device,
        f"CRM {crm_name(cfg, variant)}" if crm else "no CRM",
        f"{n_train:,}",
    )
    return model, tokenizer, (crm.spec if crm else None)
