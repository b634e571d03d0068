"""Conventional recommendation models (the CRM zoo) and their Ray Train loop.

`load_crm(dir)` gives a trained CRM without Ray; `represent` turns samples or a serve request
into R_c through `features.FeatureEncoder`.
"""

from reclora_ray.crm.checkpoint import CRMCheckpointError, load_crm
from reclora_ray.crm.represent import represent_request, represent_samples, represent_split

__all__ = ["CRMCheckpointError", "load_crm", "represent_request", "represent_samples", "represent_split"]
