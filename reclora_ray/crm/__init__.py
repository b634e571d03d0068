"""Conventional recommendation models (the CRM zoo) and their Ray Train loop.

`load_crm(dir)` gives a trained CRM without Ray; `CRM.representation(batch, lora.gate_input)` on a
`features.FeatureEncoder` batch is R_c (`represent(batch)`, the head's input, by default).
"""

from reclora_ray.crm.checkpoint import CRMCheckpointError, load_crm

__all__ = ["CRMCheckpointError", "load_crm"]
