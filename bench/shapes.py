"""Random-weight Llama models of real shapes, shared by the benchmarks (no download needed)."""

from __future__ import annotations

import torch

LLAMA_SHAPES = {  # LlamaConfig fields of the real models
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
    "llama-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
}


def random_llama(
    shape: str, *, layers: int | None = None, dtype=torch.float32, device="cpu", pad_token_id=0, seed: int = 0
):
    """A randomly initialised LlamaForCausalLM of a named shape (optionally with fewer layers), built
    directly on `device` in `dtype`, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(LLAMA_SHAPES[shape])
    if layers:
        fields["num_hidden_layers"] = layers
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(
                LlamaConfig(**fields, pad_token_id=pad_token_id, max_position_embeddings=2048)
            ).eval()
    finally:
        torch.set_default_dtype(previous)
