import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 200
CRM_DIM = 12


def tiny_llama(seed: int = 0, hidden: int = 64) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    return LlamaForCausalLM(config).eval()


def randomize_lora_b(model, seed: int = 1) -> None:
    """Non-zero B (LoRA starts at B = 0) so that the adapter changes the output and A and the gate get gradient."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.lora_layers().values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.2)


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(7)
    input_ids = torch.randint(0, VOCAB, (3, 9), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0  # one left-padded row
    crm_repr = torch.randn(3, CRM_DIM, generator=gen)
    return input_ids, attention_mask, crm_repr


@pytest.fixture
def make_llama():
    return tiny_llama


@pytest.fixture
def randomize():
    return randomize_lora_b
