"""Wrap a Hugging Face causal LM with personalized LoRA layers; the wrapper model that routes R_c.

Parameter names (the adapter state dict; stable, used by plora.io's save_adapter / load_adapter):
    gate.{fc1,norm,fc2}.{weight,bias}              the shared gate (variant plora, gate shared)
    base_model.<module path>.lora_A                (N_m*r, d_in)  A_cat, PEFT layout
    base_model.<module path>.lora_B                (d_out, N_m*r) B_cat, PEFT layout
    base_model.<module path>.gate.*                the per-layer gates (gate per_layer)
where <module path> is the wrapped module's name in the HF model, e.g.
`model.layers.0.self_attn.q_proj`. The base weights move to `<module path>.base_layer.*` and are frozen.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional

import torch
from torch import nn

from reclora_ray.config import LoRAConfig
from reclora_ray.llm.plora.layer import Gate, PLoRALinear, base_features, matches_target


def wrap_lora_layers(
    model: nn.Module, cfg: LoRAConfig, crm_dim: int, dtype: torch.dtype = torch.float32
) -> dict[str, PLoRALinear]:
    """Freeze `model` and replace its target layers in place; returns {module path: layer}."""
    if not cfg.target_modules:
        raise ValueError("lora.target_modules is empty: name at least one layer, e.g. [q_proj, v_proj]")
    for param in model.parameters():
        param.requires_grad_(False)
    targets = [(n, m) for n, m in model.named_modules() if n and matches_target(n, cfg.target_modules)]
    if not targets:
        linear_names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"lora.target_modules {cfg.target_modules} match no module of {type(model).__name__}; "
            f"its Linear layers are named {linear_names}"
        )
    gated = cfg.variant == "plora"
    r, n_meta = {"plora": (cfg.r, cfg.n_meta), "lora": (cfg.r, 1), "lora_same_params": (cfg.r * cfg.n_meta, 1)}[
        cfg.variant
    ]
    layers = {}
    for name, module in targets:
        if isinstance(module, PLoRALinear):
            raise ValueError(f"{name} is already wrapped with personalized LoRA")
        try:
            base_features(module)
        except TypeError as exc:
            raise TypeError(f"target module {name}: {exc}") from None
        gate = None
        if gated and cfg.gate == "per_layer":
            gate = _make_gate(cfg, crm_dim).to(device=_device_of(module), dtype=dtype)
        layer = PLoRALinear(
            module,
            name=name,
            r=r,
            n_meta=n_meta,
            scaling=cfg.alpha / r,
            dropout=cfg.dropout,
            gated=gated,
            mixing=cfg.mixing,
            gate=gate,
            dtype=dtype,
        )
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
        layers[name] = layer
    return layers


def _make_gate(cfg: LoRAConfig, crm_dim: int) -> Gate:
    return Gate(crm_dim, cfg.gate_hidden, cfg.n_meta, cfg.temperature, cfg.gate_dropout, cfg.gate_arch)


class PersonalizedLoRAModel(nn.Module):
    """A frozen causal LM whose target layers carry personalized LoRA, routed by the CRM's R_c.

    forward(input_ids, attention_mask, crm_repr, labels) computes the gate weights once (shared
    gate) or per layer (per_layer gate), sets them on the layers for the duration of the call,
    and runs the HF model; extra keyword arguments (e.g. logits_to_keep=1 for scoring) pass through.
    """

    def __init__(
        self, base_model: nn.Module, lora_config: LoRAConfig, crm_dim: int, dtype: torch.dtype = torch.float32
    ):
        super().__init__()
        self.lora_config = dataclasses.replace(lora_config, target_modules=list(lora_config.target_modules))
        self.crm_dim = crm_dim
        self.base_model = base_model
        layers = wrap_lora_layers(base_model, self.lora_config, crm_dim, dtype)
        self.lora_layer_names = list(layers)
        self.gated = self.lora_config.variant == "plora"
        shared = self.gated and self.lora_config.gate == "shared"
        self.gate = (
            _make_gate(self.lora_config, crm_dim).to(device=_device_of(base_model), dtype=dtype) if shared else None
        )

    # ----------------------------------------------------------------- structure

    def lora_layers(self) -> dict[str, PLoRALinear]:
        return {name: self.base_model.get_submodule(name) for name in self.lora_layer_names}

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The gate and meta-LoRA parameters (the trainable part), keyed by their names in this model."""
        own = {id(p) for p in self._adapter_parameters()}
        return {n: p for n, p in self.named_parameters() if id(p) in own}

    def _adapter_parameters(self) -> Iterator[nn.Parameter]:
        if self.gate is not None:
            yield from self.gate.parameters()
        for layer in self.lora_layers().values():
            yield layer.lora_A
            yield layer.lora_B
            if layer.gate is not None:
                yield from layer.gate.parameters()

    # ----------------------------------------------------------------- routing

    def gate_weights(self, crm_repr: torch.Tensor) -> torch.Tensor:
        """alpha: (batch, N_m) with the shared gate, (batch, layers, N_m) with per-layer gates."""
        if not self.gated:
            raise ValueError(f"variant {self.lora_config.variant!r} has no gate")
        crm_repr = self._check_crm_repr(crm_repr)
        if self.gate is not None:
            return self.gate(crm_repr)
        return torch.stack([layer.gate(crm_repr) for layer in self.lora_layers().values()], dim=1)

    @contextlib.contextmanager
    def routing(self, crm_repr: Optional[torch.Tensor]) -> Iterator[None]:
        """Set the per-sample gate weights on every wrapped layer for the span of the block."""
        if not self.gated:
            yield
            return
        if crm_repr is None:
            raise ValueError("variant 'plora' needs crm_repr (batch x crm_dim), the CRM representation R_c")
        alpha = self.gate_weights(crm_repr.detach())  # the CRM is frozen: no gradient flows into it
        layers = list(self.lora_layers().values())
        per_layer = [alpha] * len(layers) if alpha.dim() == 2 else alpha.unbind(dim=1)
        with _alphas_set(layers, per_layer):
            yield

    def _check_crm_repr(self, crm_repr: torch.Tensor) -> torch.Tensor:
        if crm_repr.dim() != 2 or crm_repr.shape[1] != self.crm_dim:
            raise ValueError(f"crm_repr must be (batch, {self.crm_dim}); got shape {tuple(crm_repr.shape)}")
        return crm_repr

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        crm_repr: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        **kwargs,
    ):
        if self.gated and crm_repr is not None and crm_repr.shape[0] != input_ids.shape[0]:
            raise ValueError(f"crm_repr has {crm_repr.shape[0]} rows but input_ids has {input_ids.shape[0]}")
        with self.routing(crm_repr):
            return self.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    # ----------------------------------------------------------------- activation checkpointing

    def activation_checkpointing_enable(self) -> None:
        """HF activation checkpointing whose recomputation (during backward, after forward has
        returned and cleared the gate weights) sees the gate weights of its own forward."""
        self.base_model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": self._checkpoint_contexts}
        )

    def _checkpoint_contexts(self):
        layers = list(self.lora_layers().values())
        captured = [layer.alpha for layer in layers]
        return contextlib.nullcontext(), _alphas_set(layers, captured)


@contextlib.contextmanager
def _alphas_set(layers: list[PLoRALinear], alphas) -> Iterator[None]:
    previous = [layer.alpha for layer in layers]
    try:
        for layer, alpha in zip(layers, alphas):
            layer.alpha = alpha
        yield
    finally:
        for layer, alpha in zip(layers, previous):
            layer.alpha = alpha


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def unwrap(model: nn.Module) -> PersonalizedLoRAModel:
    """The PersonalizedLoRAModel inside a DeepSpeed engine / DDP wrapper (their `.module`), or itself."""
    while not isinstance(model, PersonalizedLoRAModel) and hasattr(model, "module"):
        model = model.module
    if not isinstance(model, PersonalizedLoRAModel):
        raise TypeError(f"expected a PersonalizedLoRAModel (or a wrapper of one), got {type(model).__name__}")
    return model


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of the gate and meta-LoRA parameters, for checkpointing."""
    return {n: p.detach().cpu().clone() for n, p in unwrap(model).adapter_state_dict().items()}
