"""Candidate-likelihood scoring with the shared prefix cache, and the next-item prompt."""

import numpy as np
import pandas as pd
import pytest
import torch

from reclora_ray.config import LoRAConfig
from reclora_ray.data.prepared import Sequences
from reclora_ray.llm.collate import IGNORE_INDEX, PromptCollator
from reclora_ray.llm.next_item import NextItemInputs, candidate_logliks, full_prompt_logliks
from reclora_ray.llm.plora import PersonalizedLoRAModel
from reclora_ray.llm.prompt import PromptBuilder

from .conftest import CRM_DIM, VOCAB


def _Collator() -> PromptCollator:
    """PromptCollator's padding without a tokenizer (the tiny Llama has none)."""
    collator = object.__new__(PromptCollator)
    collator.pad_id = 0
    return collator


def _random_inputs(n_prompts=3, n_cand=5, seed=3):
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(1, VOCAB, size=rng.integers(6, 14))) for _ in range(n_prompts)]  # unequal: padded
    cands = [[list(rng.integers(1, VOCAB, size=rng.integers(1, 5))) for _ in range(n_cand)] for _ in range(n_prompts)]
    return prompts, cands


def test_cached_prefix_equals_scoring_every_full_prompt(llama):
    prompts, cands = _random_inputs()
    cached = candidate_logliks(llama, _Collator(), prompts, cands)
    full = full_prompt_logliks(llama, _Collator(), prompts, cands)
    assert cached.shape == (3, 5)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)
    # A one-token title is scored from the prefix's last position alone.
    one = [[[c[0]] for c in row] for row in cands]
    torch.testing.assert_close(candidate_logliks(llama, _Collator(), prompts, one),
                               full_prompt_logliks(llama, _Collator(), prompts, one), atol=1e-4, rtol=0)


def test_cached_prefix_routes_each_prompts_gate_to_its_candidates(llama, randomize):
    cfg = LoRAConfig(variant="plora", r=2, n_meta=4, target_modules=["q_proj", "v_proj", "up_proj"], temperature=0.5)
    model = PersonalizedLoRAModel(llama, cfg, crm_dim=CRM_DIM).eval()
    randomize(model)
    prompts, cands = _random_inputs(seed=5)
    crm_repr = torch.randn(3, CRM_DIM, generator=torch.Generator().manual_seed(0)) * 3
    cached = candidate_logliks(model, _Collator(), prompts, cands, crm_repr)
    torch.testing.assert_close(cached, full_prompt_logliks(model, _Collator(), prompts, cands, crm_repr),
                               atol=1e-4, rtol=0)
    # The gate matters: another user's R_c gives other scores.
    other = candidate_logliks(model, _Collator(), prompts, cands, crm_repr.flip(0))
    assert not torch.allclose(cached, other, atol=1e-3)


def test_unequal_candidate_counts_are_refused(llama):
    prompts, cands = _random_inputs()
    cands[1] = cands[1][:-1]
    with pytest.raises(ValueError, match="same number of candidates"):
        candidate_logliks(llama, _Collator(), prompts, cands)


def test_prompt_lists_history_and_candidates_and_training_targets_the_title():
    from transformers import AutoTokenizer

    from reclora_ray.base_model import _tiny_random_dir

    titles = ["Alpha (1990)", "Beta (1991)", "Gamma (1992)", "Delta (1993)", "Epsilon (1994)"]
    tokenizer = AutoTokenizer.from_pretrained(str(_tiny_random_dir()))
    items = pd.DataFrame({"item_id": range(5), "title": titles})
    users = pd.DataFrame({"user_id": [0]})
    seqs = Sequences(offsets=np.array([0, 4]), item_ids=np.array([0, 1, 2, 3], dtype=np.int32),
                     ratings=np.ones(4, np.float32), labels=np.ones(4, np.int8), timestamps=np.arange(4))
    inputs = NextItemInputs(PromptBuilder("ml-100k", items, users), PromptCollator(tokenizer, 256), seqs, history=2)
    cands = np.array([[4, 3]])
    [prompt] = inputs.prompt_ids([0], [3], cands)
    text = tokenizer.decode(prompt)
    # The two behaviours before position 3, oldest first; then the candidates.
    assert "watched Beta (1991), Gamma (1992) in the previous" in text and "Alpha" not in text
    assert "following 2 movie titles: Epsilon (1994), Delta (1993). Answer:" in text
    batch = inputs.training_batch([0], [3], cands, [1])
    labels = batch["labels"][0]
    answer = labels[labels != IGNORE_INDEX].tolist()
    assert tokenizer.decode(answer) == "Delta (1993)" and answer == inputs.title_ids[3]
