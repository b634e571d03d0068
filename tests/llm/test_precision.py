"""llm.dtype resolution, fp32 answer scores over any base dtype, and the adapter's precision."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reclora_ray import base_model as base_module
from reclora_ray.base_model import resolve_dtype, use_cpu_eager_attention
from reclora_ray.config import ConfigError, LoRAConfig, load_config
from reclora_ray.llm.base import use_chat_template
from reclora_ray.llm.collate import IGNORE_INDEX
from reclora_ray.llm.model import answer_scores, training_loss
from reclora_ray.llm.plora import PersonalizedLoRAModel, PLoRALinear
from tests.llm.conftest import CRM_DIM, VOCAB, randomize_lora_b, tiny_llama

YES, NO = 11, 17


def fake_devices(monkeypatch, *, cuda_bf16: bool, cpu_bf16: bool):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: cuda_bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(base_module, "cpu_has_native_bf16", lambda: cpu_bf16)


@pytest.mark.parametrize(
    "cuda_bf16, cpu_bf16, on_cuda, on_cpu",
    [
        (True, True, torch.bfloat16, torch.bfloat16),  # A100/H100 node, AVX512-BF16 / AMX host
        (False, False, torch.float16, torch.float32),  # V100 node, a CPU without native bf16
    ],
)
def test_auto_is_the_native_half_precision_of_each_device(monkeypatch, cuda_bf16, cpu_bf16, on_cuda, on_cpu):
    fake_devices(monkeypatch, cuda_bf16=cuda_bf16, cpu_bf16=cpu_bf16)
    assert resolve_dtype("auto", torch.device("cuda")) is on_cuda
    assert resolve_dtype("auto", torch.device("cpu")) is on_cpu


def test_an_explicit_dtype_wins_and_aliases_are_accepted(monkeypatch):
    fake_devices(monkeypatch, cuda_bf16=True, cpu_bf16=False)
    assert resolve_dtype("float32", torch.device("cuda")) is torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) is torch.bfloat16  # slow there, but asked for
    assert resolve_dtype("fp16", torch.device("cpu")) is torch.float16
    assert load_config("tiny", ["llm.dtype=bf16"]).llm.dtype == "bf16"
    with pytest.raises(ConfigError, match="llm.dtype"):
        load_config("tiny", ["llm.dtype=half"])


def test_bf16_on_a_gpu_without_it_stops_with_advice(monkeypatch):
    fake_devices(monkeypatch, cuda_bf16=False, cpu_bf16=True)
    with pytest.raises(ValueError, match="V100.*no bf16 support.*float16"):
        resolve_dtype("bfloat16", torch.device("cuda"))


def test_every_packaged_config_but_the_test_one_defaults_to_auto():
    from reclora_ray.config import PACKAGED_CONFIGS

    users = [name for name in PACKAGED_CONFIGS if name != "tiny"]
    assert {name: load_config(name).llm.dtype for name in users} == dict.fromkeys(users, "auto")


def test_load_base_follows_auto_on_this_cpu():
    from reclora_ray.base_model import cpu_has_native_bf16, load_base

    model, _ = load_base(load_config("tiny", ["llm.dtype=auto"]).llm, device="cpu")
    assert model.dtype is (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)


def test_chat_template_defaults_on_where_the_tokenizer_has_one():
    cfg = load_config("tiny").llm
    with_template = type("Tok", (), {"chat_template": "{{ messages }}"})()
    without = type("Tok", (), {"chat_template": None})()
    assert use_chat_template(cfg, with_template) and not use_chat_template(cfg, without)
    forced_off = load_config("tiny", ["llm.chat_template=false"]).llm
    assert not use_chat_template(forced_off, with_template)


def _inputs(seed=3, batch=4, length=10):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask, torch.clamp(mask.cumsum(1) - 1, min=0), torch.randn(batch, CRM_DIM, generator=gen)


def _plora(dtype=torch.float32):
    model = PersonalizedLoRAModel(
        tiny_llama().to(dtype), LoRAConfig(r=2, n_meta=3, target_modules=["q_proj", "v_proj"]), crm_dim=CRM_DIM
    )
    randomize_lora_b(model)
    return model.eval()


@pytest.mark.parametrize("kind", ["base", "plora"])
def test_fp32_answer_scores_equal_the_fp32_logits(kind):
    ids, mask, pos, crm = _inputs()
    llm = tiny_llama() if kind == "base" else _plora()
    extra = {} if kind == "base" else {"crm_repr": crm}
    with torch.no_grad():
        out = llm(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True, **extra)
        scores = answer_scores(llm, out.hidden_states[-1][:, -1], (YES, NO))
    assert scores.dtype is torch.float32
    torch.testing.assert_close(scores, out.logits[:, -1, [YES, NO]], atol=1e-5, rtol=1e-5)


def test_answer_scores_of_a_bf16_base_do_not_collapse_like_its_bf16_logits():
    # SmolLM2 at the answer slot: s_yes and s_no both near 24, their difference small. There the
    # bf16 step of a logit is 0.125, so different prompts share one bf16 P(yes).
    model = tiny_llama().to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    common = torch.randn(64, generator=gen)
    hidden = (common + 0.05 * torch.randn(64, 64, generator=gen)).to(torch.bfloat16)  # 64 prompts
    with torch.no_grad():
        rows = common * 24 / common.dot(common) + 0.01 * torch.randn(2, 64, generator=gen)
        model.lm_head.weight[[YES, NO]] = rows.to(torch.bfloat16)
        bf16_logits = model.lm_head(hidden)[:, [YES, NO]]
    scores = answer_scores(model, hidden, (YES, NO))
    assert scores.dtype is torch.float32 and 20 < scores.mean() < 28
    torch.testing.assert_close(scores, hidden.float() @ model.lm_head.weight[[YES, NO]].float().T)
    assert len(torch.unique(torch.softmax(scores, -1)[:, 0])) == 64
    assert len(torch.unique(torch.softmax(bf16_logits.float(), -1)[:, 0])) < 32


def _training_batch(ids, mask, pos, answers):
    """Prompt rows + right-aligned answers of different lengths, labels on the answers only."""
    width = ids.shape[1] + max(len(a) for a in answers)
    rows, labels, masks = [], [], []
    for row, m, answer in zip(ids, mask, answers):
        real = row[m.bool()].tolist() + answer
        pad = width - len(real)
        rows.append([0] * pad + real)
        masks.append([0] * pad + [1] * len(real))
        labels.append([IGNORE_INDEX] * (width - len(answer)) + answer)
    mask = torch.tensor(masks)
    return {
        "input_ids": torch.tensor(rows),
        "attention_mask": mask,
        "position_ids": torch.clamp(mask.cumsum(1) - 1, min=0),
        "labels": torch.tensor(labels),
    }


def test_the_answer_positions_lm_loss_equals_the_full_lm_loss():
    ids, mask, pos, crm = _inputs()
    batch = _training_batch(ids, mask, pos, [[YES, 5], [NO, 5], [YES, 5, 2], [NO]])
    model = _plora()
    full = model(**batch, crm_repr=crm).loss
    ours = training_loss(model, batch, crm, "lm", (YES, NO))
    torch.testing.assert_close(ours, full, atol=1e-6, rtol=1e-6)


def test_yes_no_loss_is_the_two_way_cross_entropy_at_the_answer_slot():
    ids, mask, pos, crm = _inputs()
    batch = _training_batch(ids, mask, pos, [[YES, 5], [NO, 5], [YES, 5], [NO, 5]])
    model = _plora()
    logits = model(**batch, crm_repr=crm).logits[:, -3, [YES, NO]]  # the slot before "Yes"/"No"
    expected = F.cross_entropy(logits, torch.tensor([0, 1, 0, 1]))
    torch.testing.assert_close(training_loss(model, batch, crm, "yes_no", (YES, NO)), expected, atol=1e-5, rtol=1e-5)


def test_a_bf16_base_trains_fp32_adapter_parameters():
    ids, mask, pos, crm = _inputs()
    batch = _training_batch(ids, mask, pos, [[YES, 5], [NO, 5], [YES, 5], [NO, 5]])
    model = _plora(torch.bfloat16)
    layer = next(iter(model.lora_layers().values()))
    assert layer.base_layer.weight.dtype is torch.bfloat16 and layer.lora_A.dtype is torch.float32
    loss = training_loss(model.train(), batch, crm, "lm", (YES, NO))
    loss.backward()
    assert layer.lora_A.grad.dtype is torch.float32 and torch.isfinite(layer.lora_A.grad).all()
    assert layer.lora_A.grad.abs().sum() > 0 and model.gate.fc1.weight.grad.dtype is torch.float32
    assert all(p.grad is None for n, p in model.named_parameters() if "base_layer" in n)


def test_lora_a_starts_as_peft_does_per_meta_lora():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    d_in = 576
    ours = PLoRALinear(nn.Linear(d_in, 64), name="q", r=8, n_meta=16, scaling=2.0)
    peft = get_peft_model(nn.Sequential(nn.Linear(d_in, 64)), LoraConfig(r=8, lora_alpha=16, target_modules=["0"]))
    peft_a = peft.base_model.model[0].lora_A["default"].weight
    bound = 1 / math.sqrt(d_in)  # kaiming_uniform(a=sqrt(5)) over fan_in = d_in
    assert ours.lora_A.abs().max() <= bound and peft_a.abs().max() <= bound
    assert peft_a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)
    for block in ours.lora_A.detach().view(16, 8, d_in):  # each meta-LoRA on its own, like PEFT's A
        assert block.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.count_nonzero(ours.lora_B) == 0


def test_training_on_a_cpu_uses_eager_attention_with_the_same_loss_and_gradients():
    ids, mask, pos, crm = _inputs()
    batch = _training_batch(ids, mask, pos, [[YES, 5], [NO, 5], [YES, 5, 2], [NO]])
    results = {}
    for kernel in ("sdpa", "eager"):
        model = _plora().train()
        base = model.base_model
        base.set_attn_implementation("sdpa")
        if kernel == "eager":
            use_cpu_eager_attention(base, torch.device("cpu"))
        assert base.config._attn_implementation == kernel
        loss = training_loss(model, batch, crm, "lm", (YES, NO))
        loss.backward()
        results[kernel] = (loss.detach(), model.gate.fc1.weight.grad.clone())
    torch.testing.assert_close(results["eager"], results["sdpa"], atol=1e-5, rtol=1e-4)

    gpu_model = tiny_llama()
    gpu_model.set_attn_implementation("sdpa")
    use_cpu_eager_attention(gpu_model, torch.device("cuda"))
    assert gpu_model.config._attn_implementation == "sdpa"  # a GPU keeps its own kernel
