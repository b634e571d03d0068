"""reclora-ray: RecLoRA (lifelong personalized LoRA for LLM recommendation) on Ray."""

__version__ = "0.1.0"
