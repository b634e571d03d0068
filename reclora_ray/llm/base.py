"""Conventions of the base LLM that prompts and scoring share: its answer tokens and whether
prompts go in its chat template. Loading the model itself is reclora_ray/base_model.py.

Why prompts end the way they do: docs/architecture.md ("How a sample becomes model input").
"""

from __future__ import annotations

from reclora_ray.config import LLMConfig


def use_chat_template(llm_cfg: LLMConfig, tokenizer) -> bool:
    """`llm.chat_template`, where null means: on when the tokenizer has a chat template (an
    instruction-tuned model answers Yes/No far more readily inside its own template)."""
    if llm_cfg.chat_template is None:
        return bool(getattr(tokenizer, "chat_template", None))
    return llm_cfg.chat_template


def answer_token_ids(tokenizer) -> tuple[int, int]:
    """Token ids of the answers "Yes" and "No" as they follow a prompt (which ends in a newline).

    Read from the tokenizer, never hard-coded: each answer word must be one token, and the two
    must differ, else the two-way softmax at the answer slot would not be the model's answer.
    """
    prefix = tokenizer.encode("\n", add_special_tokens=False)
    ids = []
    for word in ("Yes", "No"):
        full = tokenizer.encode("\n" + word, add_special_tokens=False)
        if full[: len(prefix)] != prefix or len(full) != len(prefix) + 1:
            pieces = tokenizer.convert_ids_to_tokens(full[len(prefix) :])
            raise ValueError(f"the tokenizer splits the answer {word!r} into {pieces}; it must be one token")
        ids.append(full[-1])
    if ids[0] == ids[1]:
        raise ValueError(f"the tokenizer maps 'Yes' and 'No' to the same token id {ids[0]}")
    return ids[0], ids[1]
