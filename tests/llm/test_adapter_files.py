"""Adapter directories: the project's own files under names no other library claims, older runs
still loadable, and plain-LoRA variants saved as standard PEFT adapters."""

import dataclasses
import json

import pytest
import torch
from peft import PeftModel

from reclora_ray.config import LoRAConfig
from reclora_ray.llm.plora import PersonalizedLoRAModel, load_adapter, read_adapter_config, save_adapter

CRM_DIM = 12


@pytest.mark.parametrize("variant", ["lora", "lora_same_params"])
def test_plain_lora_is_also_a_peft_adapter_with_the_same_logits(make_llama, batch, randomize, tmp_path, variant):
    input_ids, mask, _ = batch
    model = PersonalizedLoRAModel(make_llama(), LoRAConfig(variant=variant, n_meta=3), CRM_DIM).eval()
    randomize(model)
    expected = model(input_ids, mask).logits
    save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "reclora_adapter.json",
        "reclora_adapter.safetensors",
    ]
    peft_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert peft_config["peft_type"] == "LORA" and peft_config["r"] == (8 * 3 if variant == "lora_same_params" else 8)
    peft_model = PeftModel.from_pretrained(make_llama(), tmp_path / "adapter").eval()
    with torch.no_grad():
        got = peft_model(input_ids=input_ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert not torch.allclose(got, make_llama()(input_ids=input_ids, attention_mask=mask).logits, atol=1e-3)
    # the project's loader reads its own files beside PEFT's
    loaded = load_adapter(make_llama(), tmp_path / "adapter").eval()
    torch.testing.assert_close(loaded(input_ids, mask).logits, expected, atol=1e-6, rtol=0)


def test_personalized_adapter_has_no_peft_files_and_older_runs_still_load(make_llama, batch, randomize, tmp_path):
    input_ids, mask, crm = batch
    model = PersonalizedLoRAModel(
        make_llama(), dataclasses.replace(LoRAConfig(n_meta=4), temperature=2.0), CRM_DIM
    ).eval()
    randomize(model)
    expected = model(input_ids, mask, crm).logits
    save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "reclora_adapter.json",
        "reclora_adapter.safetensors",
    ]
    # A run written before the rename: adapter.safetensors + adapter_config.json (format reclora-plora).
    old = tmp_path / "old"
    old.mkdir()
    (tmp_path / "adapter" / "reclora_adapter.json").rename(old / "adapter_config.json")
    (tmp_path / "adapter" / "reclora_adapter.safetensors").rename(old / "adapter.safetensors")
    assert read_adapter_config(old)["format"] == "reclora-plora"
    torch.testing.assert_close(
        load_adapter(make_llama(), old).eval()(input_ids, mask, crm).logits, expected, atol=1e-6, rtol=0
    )
    # A PEFT adapter folder is not mistaken for one of ours.
    (old / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(FileNotFoundError, match="reclora_adapter.json: no adapter config"):
        load_adapter(make_llama(), old)
