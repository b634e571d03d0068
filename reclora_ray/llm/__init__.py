"""Base-model loading, personalized LoRA, prompts, tuning and batch scoring."""
