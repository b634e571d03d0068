"""Personalized LoRA on an 8-bit (bitsandbytes Linear8bitLt) base, run on CPU."""

import bitsandbytes as bnb
import pytest
import torch
from transformers import BitsAndBytesConfig, LlamaForCausalLM

from reclora_ray.config import LoRAConfig
from reclora_ray.llm.plora import PersonalizedLoRAModel, load_adapter, save_adapter, trainable_state_dict

CRM_DIM = 12


@pytest.fixture
def int8_llama(make_llama, tmp_path):
    make_llama().save_pretrained(tmp_path / "base")

    def load():
        quant = BitsAndBytesConfig(load_in_8bit=True)
        return LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=quant, device_map="cpu").eval()

    return load


@pytest.mark.filterwarnings("ignore:MatMul8bitLt")
def test_8bit_base_trains_only_the_adapter(int8_llama, make_llama, batch, randomize, tmp_path):
    input_ids, mask, crm = batch
    base_logits = int8_llama()(input_ids=input_ids, attention_mask=mask).logits
    model = PersonalizedLoRAModel(int8_llama(), LoRAConfig(n_meta=4, temperature=1.0, gate_dropout=0.0), CRM_DIM)
    layer = model.lora_layers()["model.layers.0.self_attn.q_proj"]
    assert isinstance(layer.base_layer, bnb.nn.Linear8bitLt) and layer.base_layer.weight.dtype == torch.int8
    assert torch.equal(model.eval()(input_ids, mask, crm).logits, base_logits)  # B = 0 at init

    fp32 = PersonalizedLoRAModel(make_llama(), LoRAConfig(n_meta=4, temperature=1.0), CRM_DIM).eval()
    randomize(fp32)
    model.load_state_dict(trainable_state_dict(fp32), strict=False)
    personalized = model(input_ids, mask, crm).logits
    reference = fp32(input_ids, mask, crm).logits
    quantization_error = (base_logits - make_llama()(input_ids=input_ids, attention_mask=mask).logits).abs().max()
    assert (personalized - base_logits).abs().max() > 10 * quantization_error  # the adapter acts
    torch.testing.assert_close(personalized, reference, atol=3 * quantization_error.item(), rtol=0)

    int8_before = layer.base_layer.weight.clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()(input_ids, mask, crm, labels=input_ids).loss.backward()
    optimizer.step()
    assert torch.equal(layer.base_layer.weight, int8_before)
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(model.adapter_state_dict())

    save_adapter(model, tmp_path / "adapter")
    loaded = load_adapter(int8_llama(), tmp_path / "adapter").eval()
    assert torch.equal(loaded(input_ids, mask, crm).logits, model.eval()(input_ids, mask, crm).logits)
