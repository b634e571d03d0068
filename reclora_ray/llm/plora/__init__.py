"""Personalized LoRA (paper section 3.2): a plug-in module for any Hugging Face causal LM.

model = PersonalizedLoRAModel(hf_causal_lm, cfg.lora, crm_dim)   # freezes the base, wraps targets
out = model(input_ids, attention_mask, crm_repr=R_c, labels=labels)
save_adapter(model, dir); model = load_adapter(fresh_base, dir)
export_user_adapter(model, R_c[i], dir)   # one user's adapter as a standard PEFT LoRA
"""

from reclora_ray.llm.plora.io import adapter_files, export_user_adapter, load_adapter, read_adapter_config, save_adapter
from reclora_ray.llm.plora.layer import Gate, PLoRALinear
from reclora_ray.llm.plora.model import PersonalizedLoRAModel, trainable_state_dict, unwrap, wrap_lora_layers

__all__ = [
    "Gate",
    "adapter_files",
    "PLoRALinear",
    "PersonalizedLoRAModel",
    "export_user_adapter",
    "load_adapter",
    "read_adapter_config",
    "save_adapter",
    "trainable_state_dict",
    "unwrap",
    "wrap_lora_layers",
]
