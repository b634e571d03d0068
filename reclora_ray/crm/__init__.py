"""Conventional recommendation models (the CRM zoo) and their Ray Train loop.

`load_crm(dir)` gives a trained CRM without Ray; `CRM.represent(batch)` on a
`features.FeatureEncoder` batch is R_c.
"""

from reclora_ray.crm.checkpoint import CRMCheckpointError, load_crm

__all__ = ["CRMCheckpointError", "load_crm"]
