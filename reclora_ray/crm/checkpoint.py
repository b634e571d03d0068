"""The CRM checkpoint the later stages load without Ray: OUT/crm/<model>/model.safetensors + crm.json.

crm.json: {"model", "d_c", "spec" (features.FeatureSpec), "hyperparameters" (the crm config
section the model was built from), "history"}. The profile / item lookup tables are buffers,
so they are in model.safetensors with the weights.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from reclora_ray.config import CRMConfig
from reclora_ray.crm.features import FeatureSpec
from reclora_ray.crm.models import CRM, build_model

WEIGHTS = "model.safetensors"
CONFIG = "crm.json"


class CRMCheckpointError(ValueError):
    """A CRM checkpoint directory that cannot be loaded; the message names the file."""


def save_crm(model: CRM, directory: Path) -> None:
    directory = Path(directory)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS))
    payload = {
        "model": model.name,
        "d_c": model.d_c,
        "history": {"mode": model.spec.history, "k": model.spec.history_len},
        "spec": model.spec.to_dict(),
        "hyperparameters": dataclasses.asdict(model.cfg),
    }
    (directory / CONFIG).write_text(json.dumps(payload, indent=2))


def load_crm(directory: str | Path, device: str = "cpu") -> CRM:
    """The trained CRM of OUT/crm/<model>/, in eval mode; no Ray needed."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG, directory / WEIGHTS
    for path in (config_path, weights_path):
        if not path.is_file():
            raise CRMCheckpointError(f"{path} is missing: not a CRM checkpoint (run `reclora pretrain-crm`)")
    try:
        payload = json.loads(config_path.read_text())
        spec = FeatureSpec.from_dict(payload["spec"])
        cfg = crm_config_from_dict(payload["hyperparameters"])
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise CRMCheckpointError(f"{config_path} is not a valid CRM config: {exc!r}") from exc
    model = build_model(spec, cfg)
    try:
        state = load_file(str(weights_path), device=device)
    except (SafetensorError, OSError) as exc:
        raise CRMCheckpointError(f"{weights_path} is corrupt or unreadable: {exc}") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CRMCheckpointError(f"{weights_path} does not match {config_path}: {exc}") from exc
    if model.d_c != payload.get("d_c"):
        raise CRMCheckpointError(f"{config_path}: d_c {payload.get('d_c')} but the model gives {model.d_c}")
    return model.to(device).eval()


# Hyperparameters added after checkpoints were first written, with the value that reproduces
# those older checkpoints' models (their configs do not name them).
ADDED_LATER = {"recent_k": 0}


def crm_config_from_dict(payload: dict) -> CRMConfig:
    defaults = CRMConfig()
    kwargs = {name: value for name, value in ADDED_LATER.items() if name not in payload}
    for name, value in payload.items():
        default = getattr(defaults, name)  # AttributeError for an unknown key
        kwargs[name] = type(default)(**value) if dataclasses.is_dataclass(default) else value
    return CRMConfig(**kwargs)
