"""Candidate-likelihood scoring with the shared prefix cache, and the next-item prompt."""

import numpy as np
import pandas as pd
import pytest
import torch

from reclora_ray.config import LoRAConfig
from reclora_ray.data.prepared import Sequences
from reclora_ray.llm.collate import IGNORE_INDEX, PromptCollator
from reclora_ray.llm.next_item import (
    NextItemInputs,
    candidate_logliks,
    full_prompt_logliks,
    greedy_answers,
    match_answer,
)
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


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # a boolean mask; an additive one
def test_cached_prefix_equals_scoring_every_full_prompt(llama, attention):
    llama.set_attn_implementation(attention)
    prompts, cands = _random_inputs()
    cached = candidate_logliks(llama, _Collator(), prompts, cands)
    full = full_prompt_logliks(llama, _Collator(), prompts, cands)
    assert cached.shape == (3, 5)
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)
    # A one-token title is scored from the prefix's last position alone.
    one = [[[c[0]] for c in row] for row in cands]
    torch.testing.assert_close(
        candidate_logliks(llama, _Collator(), prompts, one),
        full_prompt_logliks(llama, _Collator(), prompts, one),
        atol=1e-4,
        rtol=0,
    )


def test_cached_prefix_routes_each_prompts_gate_to_its_candidates(llama, randomize):
    cfg = LoRAConfig(variant="plora", r=2, n_meta=4, target_modules=["q_proj", "v_proj", "up_proj"], temperature=0.5)
    model = PersonalizedLoRAModel(llama, cfg, crm_dim=CRM_DIM).eval()
    randomize(model)
    prompts, cands = _random_inputs(seed=5)
    crm_repr = torch.randn(3, CRM_DIM, generator=torch.Generator().manual_seed(0)) * 3
    cached = candidate_logliks(model, _Collator(), prompts, cands, crm_repr)
    torch.testing.assert_close(
        cached, full_prompt_logliks(model, _Collator(), prompts, cands, crm_repr), atol=1e-4, rtol=0
    )
    # The gate matters: another user's R_c gives other scores.
    other = candidate_logliks(model, _Collator(), prompts, cands, crm_repr.flip(0))
    assert not torch.allclose(cached, other, atol=1e-3)


def _with_attention(name: str) -> torch.nn.Module:
    model = torch.nn.Linear(1, 1)
    model.config = type("Config", (), {"_attn_implementation": name})()
    return model


def test_titles_laid_end_to_end_see_the_prompt_and_their_own_tokens_only():
    from reclora_ray.llm.next_item import _continuation_mask

    prefix_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    mask = _continuation_mask(_with_attention("sdpa"), prefix_mask, n_cand=2, fed=2)
    assert mask.shape == (2, 1, 4, 3 + 4)
    assert not mask[0, 0, :, 0].any() and mask[0, 0, :, 1:3].all()  # the prompt's padding is never seen
    own = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[1, 0, :, 3:], own)
    additive = _continuation_mask(_with_attention("eager"), prefix_mask, n_cand=2, fed=2)
    assert torch.equal(additive == 0, mask)
    with pytest.raises(ValueError, match="sdpa or eager"):
        _continuation_mask(_with_attention("flash_attention_2"), prefix_mask, n_cand=2, fed=2)


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
    seqs = Sequences(
        offsets=np.array([0, 4]),
        item_ids=np.array([0, 1, 2, 3], dtype=np.int32),
        ratings=np.ones(4, np.float32),
        labels=np.ones(4, np.int8),
        timestamps=np.arange(4),
    )
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


# --------------------------------------------------------------------------- generate and match


def _reference_greedy(llm, prompt: list[int], max_new_tokens: int, stop: set[int]) -> list[int]:
    """One prompt, no cache, no padding: the whole sequence through the model at every step."""
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        nxt = int(llm(input_ids=torch.tensor([tokens])).logits[0, -1].argmax())
        if nxt in stop:
            break
        tokens.append(nxt)
    return tokens[len(prompt) :]


def test_greedy_answers_with_the_cache_equal_uncached_greedy_decoding(llama):
    prompts, _ = _random_inputs(n_prompts=4, seed=11)  # unequal lengths: left-padded in one batch
    answers = greedy_answers(llama, _Collator(), prompts, max_new_tokens=6)
    assert answers == [_reference_greedy(llama, p, 6, set()) for p in prompts]
    assert all(len(a) == 6 for a in answers)
    # A stop token ends an answer (and is not part of it); the others go on.
    stop = answers[1][2]
    stopped = greedy_answers(llama, _Collator(), prompts, max_new_tokens=6, stop_ids={stop})
    assert stopped == [_reference_greedy(llama, p, 6, {stop}) for p in prompts]
    assert stopped[1] == answers[1][: answers[1].index(stop)]


def test_greedy_answers_route_each_prompts_gate(llama, randomize):
    cfg = LoRAConfig(variant="plora", r=2, n_meta=4, target_modules=["q_proj", "v_proj", "up_proj"], temperature=0.5)
    model = PersonalizedLoRAModel(llama, cfg, crm_dim=CRM_DIM).eval()
    randomize(model)
    prompts, _ = _random_inputs(n_prompts=3, seed=12)
    crm_repr = torch.randn(3, CRM_DIM, generator=torch.Generator().manual_seed(2)) * 3
    batched = greedy_answers(model, _Collator(), prompts, 5, crm_repr=crm_repr)
    alone = [greedy_answers(model, _Collator(), [p], 5, crm_repr=crm_repr[i : i + 1])[0] for i, p in enumerate(prompts)]
    assert batched == alone


TITLES = ["Fargo (1996)", "Heat (1995)", "Star Wars (1977)", "Heat", "Toy Story (1995)", "Amélie (2001)"]


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Fargo (1996)", 0),  # 1. exact
        ('  "fargo (1996)."\nAnd another line', 0),  # 1. case, quotes, outer punctuation, first line only
        ("Answer: Heat (1995)", 1),  # the prompt's "Answer:" repeated
        ("AMÉLIE (2001)", 5),  # Unicode case folding
        ("Fargo", 0),  # 2. the title less its year
        ("Star Wars (1978)", 2),  # 2. the same title, another year
        ("Heat", 3),  # 1. before 2.: the candidate titled "Heat" itself
        ("I think Star Wars (1977) is next", 2),  # 3. one title inside the answer
        ("Heat (1995) is my guess", 1),  # 3. "Heat" inside "Heat (1995)" is not a second title
        ("Fargo (1996), Heat (1995)", -1),  # 3. two titles: invalid
        ("Toy Stry (1995)", 4),  # 4. fuzzy: a typo
        ("Titanic (1997)", -1),  # no candidate
        ("", -1),
        ("\n\n", -1),
    ],
)
def test_generated_answers_are_matched_to_one_candidate_or_none(answer, expected):
    assert match_answer(answer, TITLES) == expected


def test_fuzzy_matching_needs_its_cutoff_and_a_unique_best():
    assert match_answer("Toy Stry (1995)", TITLES, fuzzy_cutoff=1.0) == -1  # exact rules only
    assert match_answer("Toy Stry (1995)", TITLES, fuzzy_cutoff=0.99) == -1
    assert match_answer("Heat (1996)x", ["Heat (1995)x", "Heat (1997)x"]) == -1  # two equally close titles
