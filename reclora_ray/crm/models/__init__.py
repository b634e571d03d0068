"""The CRM zoo: one module per model, one registry, one constructor."""

from __future__ import annotations

import numpy as np

from reclora_ray.config import ConfigError, CRMConfig
from reclora_ray.crm.features import FeatureSpec
from reclora_ray.crm.models.autoint import AutoInt
from reclora_ray.crm.models.base import CRM
from reclora_ray.crm.models.caser import Caser
from reclora_ray.crm.models.dcnv2 import DCNv2
from reclora_ray.crm.models.deepfm import DeepFM
from reclora_ray.crm.models.din import DIN
from reclora_ray.crm.models.gru4rec import GRU4Rec
from reclora_ray.crm.models.sasrec import SASRec
from reclora_ray.crm.models.sim import SIM

MODELS: dict[str, type[CRM]] = {m.name: m for m in (SIM, DIN, DeepFM, AutoInt, DCNv2, GRU4Rec, Caser, SASRec)}


def build_model(spec: FeatureSpec, cfg: CRMConfig, tables: dict[str, np.ndarray] | None = None) -> CRM:
    """The configured model; `tables` from `features.build_features` (None when a checkpoint fills them)."""
    if cfg.model not in MODELS:
        raise ConfigError(f"crm.model: unknown model {cfg.model!r}; one of {sorted(MODELS)}")
    return MODELS[cfg.model](spec, cfg, tables)


__all__ = ["CRM", "MODELS", "build_model"]
