"""Conventional recommendation models (the CRM zoo) and their Ray Train loop."""
