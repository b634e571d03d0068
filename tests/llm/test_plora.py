import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, Qwen2Config, Qwen2ForCausalLM
from transformers.pytorch_utils import Conv1D

from reclora_ray.config import LoRAConfig
from reclora_ray.llm.plora import (
    Gate,
    PersonalizedLoRAModel,
    PLoRALinear,
    export_user_adapter,
    load_adapter,
    save_adapter,
    trainable_state_dict,
)

CRM_DIM = 12
ATOL = 1e-5


def naive_delta_weight(layer: PLoRALinear, alpha_row: torch.Tensor) -> torch.Tensor:
    """s * sum_k alpha_k B_k A_k (paper) or s * (sum alpha B_k)(sum alpha A_k) (weights), as a (d_out, d_in) matrix."""
    a = layer.lora_A.unflatten(0, (layer.n_meta, layer.r))  # (N_m, r, d_in)
    b = layer.lora_B.unflatten(1, (layer.n_meta, layer.r)).permute(1, 0, 2)  # (N_m, d_out, r)
    if layer.mixing == "paper":
        return layer.scaling * sum(alpha_row[k] * b[k] @ a[k] for k in range(layer.n_meta))
    b_p = sum(alpha_row[k] * b[k] for k in range(layer.n_meta))
    a_p = sum(alpha_row[k] * a[k] for k in range(layer.n_meta))
    return layer.scaling * b_p @ a_p


@pytest.mark.parametrize("mixing", ["paper", "weights"])
@pytest.mark.parametrize("base_kind", ["linear", "conv1d"])
def test_layer_equals_naive_per_sample_formula(mixing, base_kind):
    torch.manual_seed(0)
    d_in, d_out = 16, 24
    base = nn.Linear(d_in, d_out) if base_kind == "linear" else Conv1D(d_out, d_in)
    layer = PLoRALinear(base, name="proj", r=3, n_meta=4, scaling=2.0, mixing=mixing)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 7, d_in)
    layer.alpha = torch.softmax(torch.randn(5, 4), dim=-1)
    out = layer(x)
    weight = base.weight if base_kind == "linear" else base.weight.T  # (d_out, d_in)
    for i in range(5):
        w_user = weight + naive_delta_weight(layer, layer.alpha[i])
        torch.testing.assert_close(out[i], F.linear(x[i], w_user, base.bias), atol=ATOL, rtol=1e-5)


def test_gate_is_paper_eq13_and_authors_variant():
    torch.manual_seed(0)
    crm = torch.randn(4, CRM_DIM)
    gate = Gate(CRM_DIM, hidden=10, n_meta=6, temperature=3.0, arch="paper").eval()
    hidden = F.relu(F.layer_norm(crm @ gate.fc1.weight.T + gate.fc1.bias, (10,), gate.norm.weight, gate.norm.bias))
    beta = hidden @ gate.fc2.weight.T + gate.fc2.bias
    torch.testing.assert_close(gate(crm), torch.softmax(beta / 3.0, dim=-1))

    authors = Gate(CRM_DIM, hidden=10, n_meta=6, temperature=3.0, arch="authors").eval()
    normed = F.layer_norm(crm, (CRM_DIM,), authors.norm.weight, authors.norm.bias)
    beta = F.relu(normed @ authors.fc1.weight.T + authors.fc1.bias) @ authors.fc2.weight.T + authors.fc2.bias
    torch.testing.assert_close(authors(crm), torch.softmax(beta / 3.0, dim=-1))


@pytest.mark.parametrize("variant", ["plora", "lora", "lora_same_params"])
def test_wrapped_model_starts_equal_to_base(make_llama, batch, variant):
    input_ids, mask, crm = batch
    reference = make_llama()(input_ids=input_ids, attention_mask=mask).logits
    model = PersonalizedLoRAModel(make_llama(), LoRAConfig(variant=variant), CRM_DIM).eval()
    assert torch.equal(model(input_ids, mask, crm).logits, reference)


def test_batch_rows_are_personalized_independently(llama, batch, randomize):
    input_ids, mask, crm = batch
    model = PersonalizedLoRAModel(llama, LoRAConfig(n_meta=4, temperature=1.0), CRM_DIM).eval()
    randomize(model)
    together = model(input_ids, mask, crm).logits
    for i in range(len(input_ids)):
        alone = model(input_ids[i : i + 1], mask[i : i + 1], crm[i : i + 1]).logits
        torch.testing.assert_close(together[i : i + 1], alone, atol=ATOL, rtol=1e-5)
    other_user = model(input_ids[:1], mask[:1], crm[1:2]).logits
    assert not torch.allclose(other_user, together[:1], atol=1e-4), "the CRM representation must change the output"


def test_gradients_reach_only_gate_and_meta_loras(llama, batch, randomize):
    input_ids, mask, crm = batch
    model = PersonalizedLoRAModel(llama, LoRAConfig(n_meta=4, temperature=1.0, gate_dropout=0.0), CRM_DIM).train()
    randomize(model)
    crm = crm.clone().requires_grad_(True)
    model(input_ids, mask, crm, labels=input_ids).loss.backward()
    adapter = model.adapter_state_dict()
    assert any(n.startswith("gate.") for n in adapter) and len(adapter) == 6 + 2 * 4  # gate + (A, B) x 4 layers
    for name, param in model.named_parameters():
        if name in adapter:
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert not param.requires_grad and param.grad is None, name
    assert crm.grad is None, "the frozen CRM's representation must be detached"


@pytest.mark.parametrize("variant", ["lora", "plora_n1"])
def test_single_meta_lora_equals_peft_lora(make_llama, batch, randomize, variant):
    input_ids, mask, crm = batch
    cfg = LoRAConfig(variant="lora") if variant == "lora" else LoRAConfig(n_meta=1)
    model = PersonalizedLoRAModel(make_llama(), cfg, CRM_DIM).eval()
    randomize(model)
    peft_model = get_peft_model(make_llama(), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    peft_params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, layer in model.lora_layers().items():
            peft_params[f"base_model.model.{name}.lora_A.default.weight"].copy_(layer.lora_A)
            peft_params[f"base_model.model.{name}.lora_B.default.weight"].copy_(layer.lora_B)
    expected = peft_model.eval()(input_ids=input_ids, attention_mask=mask).logits
    torch.testing.assert_close(model(input_ids, mask, crm).logits, expected, atol=ATOL, rtol=1e-5)


def test_variant_shapes(make_llama):
    plain = PersonalizedLoRAModel(make_llama(), LoRAConfig(variant="lora"), CRM_DIM)
    same = PersonalizedLoRAModel(make_llama(), LoRAConfig(variant="lora_same_params", n_meta=16), CRM_DIM)
    plora = PersonalizedLoRAModel(make_llama(), LoRAConfig(n_meta=16), CRM_DIM)
    q = "base_model.model.layers.0.self_attn.q_proj.lora_A"
    assert plain.adapter_state_dict()[q].shape == (8, 64) and plain.gate is None
    assert same.adapter_state_dict()[q].shape == (128, 64) and same.gate is None
    assert plora.adapter_state_dict()[q].shape == (128, 64) and plora.gate is not None
    assert same.lora_layers()["model.layers.0.self_attn.q_proj"].scaling == 16 / 128  # PEFT: alpha / rank


def test_per_layer_gate_gives_each_layer_its_own_alpha(llama, batch):
    input_ids, mask, crm = batch
    model = PersonalizedLoRAModel(llama, LoRAConfig(n_meta=4, gate="per_layer"), CRM_DIM).eval()
    assert model.gate is None
    alpha = model.gate_weights(crm)
    assert alpha.shape == (3, 4, 4)  # batch, wrapped layers, N_m
    assert not torch.allclose(alpha[:, 0], alpha[:, 1])
    assert any(".q_proj.gate.fc1.weight" in n for n in model.adapter_state_dict())


def test_routing_state_never_outlives_the_call(llama, batch):
    input_ids, mask, crm = batch
    model = PersonalizedLoRAModel(llama, LoRAConfig(n_meta=4), CRM_DIM).eval()
    model(input_ids, mask, crm)
    assert all(layer.alpha is None for layer in model.lora_layers().values())
    with pytest.raises(KeyError):
        with model.routing(crm):
            raise KeyError("boom")
    assert all(layer.alpha is None for layer in model.lora_layers().values())
    with pytest.raises(RuntimeError, match="no gate weights set"):
        model.base_model(input_ids=input_ids)
    with pytest.raises(ValueError, match="computed for 3 samples"):
        with model.routing(crm):
            model.base_model(input_ids=input_ids[:2])


def test_bad_crm_repr_is_rejected(llama, batch):
    input_ids, mask, crm = batch
    model = PersonalizedLoRAModel(llama, LoRAConfig(n_meta=4), CRM_DIM)
    with pytest.raises(ValueError, match="needs crm_repr"):
        model(input_ids, mask)
    with pytest.raises(ValueError, match=r"crm_repr must be \(batch, 12\)"):
        model(input_ids, mask, crm[:, :5])
    with pytest.raises(ValueError, match="crm_repr has 2 rows but input_ids has 3"):
        model(input_ids, mask, crm[:2])


def test_last_position_logits_for_scoring(llama, batch, randomize):
    input_ids, mask, crm = batch
    model = PersonalizedLoRAModel(llama, LoRAConfig(n_meta=4), CRM_DIM).eval()
    randomize(model)
    full = model(input_ids, mask, crm).logits
    last = model(input_ids, mask, crm, logits_to_keep=1).logits
    assert last.shape == (3, 1, full.shape[-1])
    torch.testing.assert_close(last, full[:, -1:], atol=ATOL, rtol=1e-5)


def test_activation_checkpointing_recomputes_with_the_same_gate_weights(make_llama, batch, randomize):
    input_ids, mask, crm = batch
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(3)
        model = PersonalizedLoRAModel(make_llama(), LoRAConfig(n_meta=4, gate_dropout=0.0), CRM_DIM)
        randomize(model)
        if checkpointing:
            model.activation_checkpointing_enable()
        model.train()
        model(input_ids, mask, crm, labels=input_ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.adapter_state_dict().items()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    "cfg",
    [LoRAConfig(n_meta=4), LoRAConfig(n_meta=3, mixing="weights", gate="per_layer"), LoRAConfig(variant="lora")],
    ids=["paper-shared", "weights-per_layer", "lora"],
)
def test_exported_user_adapter_reproduces_logits_in_peft(make_llama, batch, randomize, tmp_path, cfg):
    input_ids, mask, crm = batch
    model = PersonalizedLoRAModel(make_llama(), dataclasses.replace(cfg, temperature=1.0), CRM_DIM).eval()
    randomize(model)
    user = 1
    expected = model(input_ids[user : user + 1], mask[user : user + 1], crm[user : user + 1]).logits
    export_user_adapter(model, crm[user] if model.gated else None, tmp_path / "user")
    peft_model = PeftModel.from_pretrained(make_llama(), tmp_path / "user").eval()
    got = peft_model(input_ids=input_ids[user : user + 1], attention_mask=mask[user : user + 1]).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)
    assert not torch.allclose(got, make_llama()(input_ids=input_ids[user : user + 1]).logits, atol=1e-3)


def test_save_load_round_trips_exactly(make_llama, batch, randomize, tmp_path):
    input_ids, mask, crm = batch
    cfg = LoRAConfig(n_meta=4, temperature=2.0, target_modules=["q_proj", "k_proj", "v_proj"], gate_arch="authors")
    model = PersonalizedLoRAModel(make_llama(), cfg, CRM_DIM).eval()
    randomize(model)
    save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "reclora_adapter.json",
        "reclora_adapter.safetensors",
    ]
    loaded = load_adapter(make_llama(), tmp_path / "adapter").eval()
    assert loaded.lora_config == cfg and loaded.crm_dim == CRM_DIM
    saved, restored = trainable_state_dict(model), trainable_state_dict(loaded)
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    assert torch.equal(loaded(input_ids, mask, crm).logits, model(input_ids, mask, crm).logits)


def test_load_onto_another_base_fails_clearly(make_llama, tmp_path):
    save_adapter(PersonalizedLoRAModel(make_llama(), LoRAConfig(n_meta=2), CRM_DIM), tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"layer model\.layers\.0\.self_attn\.q_proj is \[32, 32\].*another shape"):
        load_adapter(make_llama(hidden=32), tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="no adapter config"):
        load_adapter(make_llama(), tmp_path)
    meta = json.loads((tmp_path / "adapter" / "reclora_adapter.json").read_text())
    meta["layers"]["model.layers.5.self_attn.q_proj"] = [64, 64]
    (tmp_path / "adapter" / "reclora_adapter.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="absent here.*layers.5"):
        load_adapter(make_llama(), tmp_path / "adapter")


def test_gpt2_conv1d_and_qwen2_target_names(batch, randomize, tmp_path):
    input_ids, mask, crm = batch
    torch.manual_seed(0)
    gpt2_config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=200, n_positions=32)
    gpt2 = PersonalizedLoRAModel(GPT2LMHeadModel(gpt2_config), LoRAConfig(n_meta=2, target_modules=["c_attn"]), CRM_DIM)
    assert list(gpt2.lora_layers()) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    randomize(gpt2.eval())
    expected = gpt2(input_ids[:1], mask[:1], crm[:1]).logits
    export_user_adapter(gpt2, crm[0], tmp_path / "gpt2")
    torch.manual_seed(0)
    peft_gpt2 = PeftModel.from_pretrained(GPT2LMHeadModel(gpt2_config), tmp_path / "gpt2").eval()
    torch.testing.assert_close(
        peft_gpt2(input_ids=input_ids[:1], attention_mask=mask[:1]).logits, expected, atol=ATOL, rtol=1e-5
    )

    qwen_config = Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=200,
    )
    qwen = PersonalizedLoRAModel(Qwen2ForCausalLM(qwen_config), LoRAConfig(n_meta=2), CRM_DIM)
    assert len(qwen.lora_layers()) == 4 and qwen(input_ids, mask, crm).logits.shape == (3, 9, 200)


def test_unsupported_or_unmatched_targets_fail_clearly(make_llama):
    with pytest.raises(TypeError, match=r"target module model\.embed_tokens: cannot wrap a .*Embedding"):
        PersonalizedLoRAModel(make_llama(), LoRAConfig(target_modules=["embed_tokens"]), CRM_DIM)
    with pytest.raises(ValueError, match=r"match no module of LlamaForCausalLM; .*'q_proj'"):
        PersonalizedLoRAModel(make_llama(), LoRAConfig(target_modules=["query"]), CRM_DIM)


def test_bf16_base_keeps_its_dtype_and_adapter_computes_in_fp32(make_llama, batch, randomize):
    input_ids, mask, crm = batch
    fp32 = PersonalizedLoRAModel(make_llama(), LoRAConfig(n_meta=4), CRM_DIM).eval()
    randomize(fp32)
    bf16 = PersonalizedLoRAModel(make_llama().to(torch.bfloat16), LoRAConfig(n_meta=4), CRM_DIM).eval()
    bf16.load_state_dict(trainable_state_dict(fp32), strict=False)
    layer = bf16.lora_layers()["model.layers.0.self_attn.q_proj"]
    assert layer.base_layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    logits = bf16(input_ids, mask, crm).logits
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), fp32(input_ids, mask, crm).logits, atol=0.1, rtol=0.05)
