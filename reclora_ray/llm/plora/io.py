"""Adapter files: save / load a personalized-LoRA adapter, export one user's adapter for PEFT.

An adapter directory holds
    reclora_adapter.safetensors   the adapter state dict (names: see model.py)
    reclora_adapter.json          {"format", "version", "lora": LoRAConfig fields, "crm_dim", "dtype",
                                   "base_model", "base_class", "layers": {module path: [d_in, d_out]}}
and, for a plain LoRA (no gate: TALLRec, ReLLa, the wo-meta-lora ablations), the same weights as a
standard PEFT adapter (adapter_config.json + adapter_model.safetensors) that
`peft.PeftModel.from_pretrained(base, dir)` loads. Runs written before these names held the
project's files as adapter.safetensors + adapter_config.json; `load_adapter` still reads them.
Nothing is pickled; loading checks the base model's layer shapes against "layers".
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from reclora_ray import storage
from reclora_ray.config import LoRAConfig
from reclora_ray.llm.plora.layer import base_features, matches_target
from reclora_ray.llm.plora.model import PersonalizedLoRAModel, trainable_state_dict, unwrap

FORMAT = "reclora-plora"
VERSION = 1
WEIGHTS_FILE = "reclora_adapter.safetensors"
CONFIG_FILE = "reclora_adapter.json"
LEGACY_FILES = ("adapter.safetensors", "adapter_config.json")  # the names of runs before 2026-12
PEFT_CONFIG_FILE = "adapter_config.json"


def save_adapter(model: nn.Module, out_dir: str | os.PathLike) -> None:
    """Write the gate and meta-LoRA weights plus the config needed to rebuild the wrapper."""
    model = unwrap(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers = model.lora_layers()
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "lora": dataclasses.asdict(model.lora_config),
        "crm_dim": model.crm_dim,
        "dtype": str(next(iter(layers.values())).lora_A.dtype).removeprefix("torch."),
        "base_model": getattr(getattr(model.base_model, "config", None), "_name_or_path", None),
        "base_class": type(model.base_model).__name__,
        "layers": {name: [layer.in_features, layer.out_features] for name, layer in layers.items()},
    }
    storage.write_bytes(out / WEIGHTS_FILE, save(trainable_state_dict(model)))
    storage.write_text(out / CONFIG_FILE, json.dumps(meta, indent=2))
    if not model.gated:  # a plain LoRA is the same for every user: a standard PEFT adapter as well
        export_user_adapter(model, None, out)


def adapter_files(adapter_dir: str | os.PathLike) -> tuple[Path, Path]:
    """(weights, config) of an adapter directory: today's names, or those of older runs."""
    directory = Path(adapter_dir)
    if (directory / CONFIG_FILE).is_file():
        return directory / WEIGHTS_FILE, directory / CONFIG_FILE
    legacy_weights, legacy_config = (directory / name for name in LEGACY_FILES)
    if legacy_config.is_file() and legacy_weights.is_file():
        try:
            if json.loads(legacy_config.read_text()).get("format") == FORMAT:
                return legacy_weights, legacy_config
        except json.JSONDecodeError:
            pass
    return directory / WEIGHTS_FILE, directory / CONFIG_FILE


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    path = adapter_files(adapter_dir)[1]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no adapter config (is {adapter_dir} a directory written by save_adapter?)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from exc
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(
            f"{path}: format {meta.get('format')!r} v{meta.get('version')}, expected {FORMAT!r} v{VERSION}"
        )
    return meta


def load_adapter(base_model: nn.Module, adapter_dir: str | os.PathLike) -> PersonalizedLoRAModel:
    """Wrap `base_model` (in place) as the saved adapter describes and load its weights."""
    meta = read_adapter_config(adapter_dir)
    lora_fields = {f.name for f in dataclasses.fields(LoRAConfig)}
    unknown = set(meta["lora"]) - lora_fields
    if unknown:
        raise ValueError(f"{adapter_files(adapter_dir)[1]}: unknown lora fields {sorted(unknown)}")
    lora_cfg = LoRAConfig(**meta["lora"])
    _check_base_shapes(base_model, lora_cfg.target_modules, meta["layers"], adapter_dir)
    model = PersonalizedLoRAModel(base_model, lora_cfg, meta["crm_dim"], dtype=getattr(torch, meta["dtype"]))
    weights_path = adapter_files(adapter_dir)[0]
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path}: adapter weights missing")
    saved = load_file(str(weights_path))
    expected = model.adapter_state_dict()
    if set(saved) != set(expected):
        missing, extra = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
        raise ValueError(
            f"{weights_path}: tensors do not match the model: missing {missing[:3]}, unexpected {extra[:3]}"
        )
    with torch.no_grad():
        for name, param in expected.items():
            if saved[name].shape != param.shape:
                raise ValueError(
                    f"{weights_path}: {name} has shape {tuple(saved[name].shape)}, the model needs {tuple(param.shape)}"
                )
            param.copy_(saved[name])
    return model


def _check_base_shapes(base_model: nn.Module, targets: list[str], saved: dict[str, list[int]], adapter_dir) -> None:
    found = {}
    for name, module in base_model.named_modules():
        if name and matches_target(name, targets):
            try:
                found[name] = list(base_features(module))
            except TypeError:
                found[name] = None
    where = f"adapter {adapter_dir} (base {type(base_model).__name__})"
    if set(found) != set(saved):
        missing, extra = sorted(set(saved) - set(found)), sorted(set(found) - set(saved))
        raise ValueError(
            f"{where}: the base model's target layers differ from the ones the adapter was trained on: "
            f"absent here {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"new here {extra[:3]}{'...' if len(extra) > 3 else ''}"
        )
    for name, shape in saved.items():
        if found[name] != shape:
            raise ValueError(
                f"{where}: layer {name} is {found[name]} (d_in, d_out) in this base model but {shape} "
                "in the adapter: it was trained on a base of another shape"
            )


def export_user_adapter(model: nn.Module, crm_repr_row: torch.Tensor | None, out_dir: str | os.PathLike) -> None:
    """Materialize one user's personalized adapter as a standard PEFT LoRA adapter.

    mixing "paper": rank N_m*r with A' = A_cat, B' = B_cat * repeat(alpha, r).
    mixing "weights": rank r with A' = sum_k alpha_k A_k, B' = sum_k alpha_k B_k.
    The PEFT lora_alpha is set so that PEFT's scaling (lora_alpha / rank) equals ours.
    `peft.PeftModel.from_pretrained(base, out_dir)` then reproduces this user's logits.
    """
    from peft import LoraConfig

    model = unwrap(model)
    layers = model.lora_layers()
    alphas = [None] * len(layers)
    if model.gated:
        if crm_repr_row is None:
            raise ValueError("variant 'plora' needs the user's crm_repr row to export a personalized adapter")
        row = crm_repr_row.reshape(1, -1)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                alpha = model.gate_weights(row.to(next(iter(layers.values())).lora_A.device))[0]
        finally:
            model.train(was_training)
        alphas = [alpha] * len(layers) if alpha.dim() == 1 else alpha.unbind(0)

    tensors, ranks, scalings = {}, set(), set()
    with torch.no_grad():
        for (name, layer), alpha in zip(layers.items(), alphas):
            lora_a, lora_b = _personal_factors(layer, alpha)
            tensors[f"base_model.model.{name}.lora_A.weight"] = lora_a.contiguous().cpu()
            tensors[f"base_model.model.{name}.lora_B.weight"] = lora_b.contiguous().cpu()
            ranks.add(lora_a.shape[0])
            scalings.add(layer.scaling)
    (rank,), (scaling,) = ranks, scalings
    lora_alpha = scaling * rank
    peft_config = LoraConfig(
        r=rank,
        lora_alpha=int(lora_alpha) if float(lora_alpha).is_integer() else lora_alpha,
        target_modules=list(model.lora_config.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        fan_in_fan_out=any(not isinstance(layer.base_layer, nn.Linear) for layer in layers.values()),
        base_model_name_or_path=getattr(getattr(model.base_model, "config", None), "_name_or_path", None),
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    storage.write_bytes(out / "adapter_model.safetensors", save(tensors))
    peft_config.save_pretrained(str(out))


def _personal_factors(layer, alpha: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A' rank x d_in, B' d_out x rank) of one layer for one user."""
    if alpha is None:
        return layer.lora_A, layer.lora_B
    alpha = alpha.to(layer.lora_A.dtype)
    if layer.mixing == "paper":
        return layer.lora_A, layer.lora_B * alpha.repeat_interleave(layer.r)
    a_meta = layer.lora_A.unflatten(0, (layer.n_meta, layer.r))  # (N_m, r, d_in)
    b_meta = layer.lora_B.unflatten(1, (layer.n_meta, layer.r))  # (d_out, N_m, r)
    return torch.einsum("k,krd->rd", alpha, a_meta), torch.einsum("k,okr->or", alpha, b_meta)
