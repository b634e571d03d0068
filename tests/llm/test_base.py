import dataclasses

import pytest
import torch

from reclora_ray import base_model as base
from reclora_ray.base_model import load_base, resolve_dtype
from reclora_ray.config import LLMConfig, load_config
from reclora_ray.llm.base import answer_token_ids


def tiny(**changes) -> LLMConfig:
    return dataclasses.replace(load_config("tiny").llm, **changes)


def test_tiny_random_is_deterministic_across_builds():
    model, tokenizer = load_base(tiny())
    base._tiny_random_dir.cache_clear()
    again, tokenizer_again = load_base(tiny())
    assert tokenizer.get_vocab() == tokenizer_again.get_vocab()
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert tokenizer.pad_token is not None and model.config.pad_token_id == tokenizer.pad_token_id


def test_answer_tokens_come_from_the_tokenizer():
    _, tokenizer = load_base(tiny())
    yes, no = answer_token_ids(tokenizer)
    assert tokenizer.decode([yes]) == "Yes" and tokenizer.decode([no]) == "No"
    for word in (" Yes", "Yes", " No", "No"):
        assert len(tokenizer.encode(word, add_special_tokens=False)) == 1


def test_answer_tokens_refuse_a_split_word():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    raw = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    with pytest.raises(ValueError, match="splits the answer 'Yes'"):
        answer_token_ids(PreTrainedTokenizerFast(tokenizer_object=raw))


def test_dtype_from_config():
    model, _ = load_base(tiny(dtype="bfloat16"))
    assert next(model.parameters()).dtype == torch.bfloat16


def test_eight_bit_on_cpu():
    from bitsandbytes.nn import Linear8bitLt

    directory = str(base._tiny_random_dir())
    full, tokenizer = load_base(tiny(model=directory))
    quantized, _ = load_base(tiny(model=directory, load_in_8bit=True, dtype="float16"))
    assert isinstance(quantized.model.layers[0].self_attn.q_proj, Linear8bitLt)
    batch = tokenizer(["Based on the movies he has watched, deduce if he will like the movie"], return_tensors="pt")
    with torch.no_grad():
        a = full(**batch).logits.float().flatten()
        b = quantized(**batch).logits.float().flatten()
    assert torch.isfinite(b).all()
    assert torch.corrcoef(torch.stack([a, b]))[0, 1] > 0.9


def test_bf16_on_a_gpu_without_it_stops(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    with pytest.raises(ValueError, match="V100-SXM2-32GB has no bf16 support; use --set llm.dtype=float16"):
        resolve_dtype("bfloat16", torch.device("cuda"))
    assert resolve_dtype("float16", torch.device("cuda")) is torch.float16
    assert resolve_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16


@pytest.mark.e2e
def test_packaged_smollm2_converts_once(tmp_path):
    cfg = LLMConfig(model="smollm2-packaged", dtype="float32", load_in_8bit=False, cache_dir=str(tmp_path))
    model, tokenizer = load_base(cfg)
    converted = [p for p in tmp_path.iterdir()]
    assert len(converted) == 1 and (converted[0] / "model.safetensors").is_file()  # no temp dirs left
    stamp = (converted[0] / "model.safetensors").stat().st_mtime_ns
    load_base(cfg)
    assert (converted[0] / "model.safetensors").stat().st_mtime_ns == stamp
    yes, no = answer_token_ids(tokenizer)
    assert tokenizer.decode([yes]) == "Yes" and tokenizer.decode([no]) == "No"
    assert model.config.model_type == "llama" and model.config.hidden_size == 576
