"""The next-item task for the LLM: iLoRA's prompt, and scoring by candidate likelihood.

Prompt (iLoRA's code; books read where movies are watched), rendered like the CTR prompt:

    This user has watched Titanic (1997), Antz (1998), ... in the previous. Please predict the
    next movie this user will watch. Choose the answer from the following 20 movie titles:
    Fargo (1996), ..., Heat (1995). Answer:

A candidate's score is the mean log-probability of its title's tokens after the prompt. The
prompt runs once (one prefix pass for a batch of prompts, left-padded, positions counting real
tokens only); the C titles then run laid end to end as one continuation on top of its key/value
cache, a block-diagonal causal mask keeping each title to the prompt and its own tokens: a
prompt costs one prefix plus one short continuation, not C full forwards, and its cache is
never copied. `full_prompt_logliks` is the plain form (every prompt + candidate as its own
sequence), kept as the reference and the benchmark's baseline.

Generate-and-match (iLoRA's reported form, `greedy_answers` + `match_answer`): the LLM writes an
answer greedily and the answer is matched to one candidate's title, or to none (an invalid answer).
"""

from __future__ import annotations

import difflib
import re
import unicodedata

import numpy as np
import torch

from reclora_ray.data.prepared import Sequences
from reclora_ray.llm.collate import IGNORE_INDEX, PromptCollator
from reclora_ray.llm.model import causal_lm, last_positions
from reclora_ray.llm.prompt import PromptBuilder, render

# iLoRA's prompt words per dataset: (past participle, noun, verb).
NEXT_ITEM_WORDS = {
    "ml-100k": ("watched", "movie", "watch"),
    "ml-1m": ("watched", "movie", "watch"),
    "ml-25m": ("watched", "movie", "watch"),
    "goodreads": ("read", "book", "read"),
    "interactions": ("interacted with", "item", "interact with"),
}


def next_item_text(dataset: str, history_titles, candidate_titles) -> str:
    if dataset not in NEXT_ITEM_WORDS:
        raise ValueError(f"no next-item wording for dataset {dataset!r}; expected one of {sorted(NEXT_ITEM_WORDS)}")
    past, noun, verb = NEXT_ITEM_WORDS[dataset]
    return (
        f"This user has {past} {', '.join(history_titles)} in the previous. "
        f"Please predict the next {noun} this user will {verb}. "
        f"Choose the answer from the following {len(candidate_titles)} {noun} titles: "
        f"{', '.join(candidate_titles)}. Answer:"
    )


class NextItemInputs:
    """Token ids of next-item prompts and of candidate titles for one prepared dataset."""

    def __init__(self, prompts: PromptBuilder, collator: PromptCollator, sequences: Sequences, history: int):
        self.prompts = prompts
        self.collator = collator
        self.sequences = sequences
        self.history = history
        tokenizer = collator.tokenizer
        # Every title's tokens as an answer, computed once: candidates repeat across prompts.
        self.title_ids = tokenizer(list(prompts.titles), add_special_tokens=False)["input_ids"]

    def history_items(self, user_ids, pos) -> np.ndarray:
        """(n, history) item ids of the behaviours before each target, -1 padded on the left."""
        user_ids = np.asarray(user_ids, dtype=np.int64)
        return self.sequences.gather(user_ids, self.sequences.recent(user_ids, pos, self.history), "item_ids")

    def prompt_ids(self, user_ids, pos, candidates: np.ndarray) -> list[list[int]]:
        titles = self.prompts.titles
        texts = []
        for hist, cand in zip(self.history_items(user_ids, pos), candidates):
            text = next_item_text(self.prompts.dataset, titles[hist[hist >= 0]], titles[cand])
            texts.append(render(text, self.prompts.tokenizer, self.prompts.chat_template))
        return self.collator.encode(texts)

    def candidate_ids(self, candidates: np.ndarray) -> list[list[list[int]]]:
        return [[self.title_ids[c] for c in row] for row in candidates]

    def training_batch(self, user_ids, pos, candidates: np.ndarray, target_index) -> dict[str, torch.Tensor]:
        """Prompt + the target's title; the loss on the title tokens only."""
        sequences, labels = [], []
        for prompt, row, t in zip(self.prompt_ids(user_ids, pos, candidates), candidates, target_index):
            answer = self.title_ids[row[t]]
            sequences.append(list(prompt) + answer)
            labels.append([IGNORE_INDEX] * len(prompt) + answer)
        return self.collator.pad(sequences, labels)


def _llm_kwargs(crm_repr: torch.Tensor | None) -> dict:
    return {} if crm_repr is None else {"crm_repr": crm_repr}


def _mean_token_logprob(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked positions of log softmax(logits)[target]: (rows, L, V), (rows, L) -> (rows,)."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    mask = mask.to(logp.dtype)
    return (logp * mask).sum(-1) / mask.sum(-1)


@torch.inference_mode()
def candidate_logliks(
    llm,
    collator: PromptCollator,
    prompt_ids: list[list[int]],
    candidate_ids: list[list[list[int]]],
    crm_repr: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, C) length-normalised log-likelihoods of each prompt's C candidates, one prefix pass.

    `llm`: a HF causal LM or a PersonalizedLoRAModel (then `crm_repr` (B, d_c) routes its gate).
    The C continuations of a prompt run as one sequence on top of its key/value cache, each
    title seeing the prompt and its own earlier tokens only (a block-diagonal causal mask)."""
    n_cand = {len(c) for c in candidate_ids}
    if len(n_cand) != 1:
        raise ValueError(f"every prompt needs the same number of candidates; got {sorted(n_cand)}")
    n_cand = n_cand.pop()
    if min(len(t) for c in candidate_ids for t in c) == 0:
        raise ValueError("a candidate title tokenizes to nothing")
    device = next(llm.parameters()).device
    n_prompts = len(prompt_ids)
    prefix = {k: v.to(device) for k, v in collator.pad(prompt_ids).items()}
    out = llm(**prefix, use_cache=True, logits_to_keep=last_positions(1), **_llm_kwargs(crm_repr))
    first_logits = out.logits[:, -1, :]  # predicts each title's first token

    width = max(len(t) for c in candidate_ids for t in c)
    titles = torch.full((n_prompts, n_cand, width), collator.pad_id, dtype=torch.long)
    title_mask = torch.zeros((n_prompts, n_cand, width), dtype=torch.long)
    for b, cands in enumerate(candidate_ids):
        for c, tokens in enumerate(cands):
            titles[b, c, : len(tokens)] = torch.tensor(tokens)
            title_mask[b, c, : len(tokens)] = 1
    titles, title_mask = titles.to(device), title_mask.to(device)
    logits = first_logits[:, None, None, :].expand(-1, n_cand, 1, -1)
    if width > 1:  # the titles' last tokens predict nothing that is scored
        fed = width - 1
        offset = torch.arange(fed, device=device)
        position_ids = prefix["attention_mask"].sum(-1)[:, None, None] + offset  # (B, 1, fed)
        rest = llm(
            input_ids=titles[:, :, :fed].reshape(n_prompts, n_cand * fed),
            attention_mask=_continuation_mask(llm, prefix["attention_mask"], n_cand, fed),
            position_ids=position_ids.expand(-1, n_cand, -1).reshape(n_prompts, n_cand * fed),
            cache=out.cache,
            use_cache=True,
            **_llm_kwargs(crm_repr),
        )
        logits = torch.cat([logits, rest.logits.view(n_prompts, n_cand, fed, -1)], dim=2)
    flat = n_prompts * n_cand
    return _mean_token_logprob(
        logits.reshape(flat, width, -1), titles.view(flat, width), title_mask.view(flat, width)
    ).view(n_prompts, n_cand)


def _continuation_mask(llm, prefix_mask: torch.Tensor, n_cand: int, fed: int) -> torch.Tensor:
    """(B, 1, C*fed, P + C*fed) attention mask of C continuations laid end to end after a
    left-padded prefix: each sees the prompt's real tokens and its own earlier tokens."""
    cand = torch.arange(n_cand, device=prefix_mask.device).repeat_interleave(fed)
    pos = torch.arange(fed, device=prefix_mask.device).repeat(n_cand)
    own = (cand[:, None] == cand[None, :]) & (pos[None, :] <= pos[:, None])
    n_q = n_cand * fed
    mask = torch.cat(
        [
            prefix_mask.bool()[:, None, None, :].expand(-1, 1, n_q, -1),
            own[None, None].expand(prefix_mask.shape[0], 1, -1, -1),
        ],
        dim=-1,
    )
    attention = causal_lm(llm).config._attn_implementation
    if attention == "sdpa":
        return mask
    if attention == "eager":  # adds the mask to the scores
        dtype = next(llm.parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    raise ValueError(
        f"candidate scoring needs sdpa or eager attention (a custom 4D mask); the model uses {attention!r}"
    )


@torch.inference_mode()
def full_prompt_logliks(
    llm,
    collator: PromptCollator,
    prompt_ids: list[list[int]],
    candidate_ids: list[list[list[int]]],
    crm_repr: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same scores with every prompt + candidate as its own sequence (one batch per prompt)."""
    device = next(llm.parameters()).device
    rows = []
    for b, (prompt, cands) in enumerate(zip(prompt_ids, candidate_ids)):
        batch = collator.pad([list(prompt) + list(t) for t in cands])
        batch = {k: v.to(device) for k, v in batch.items()}
        kwargs = {} if crm_repr is None else {"crm_repr": crm_repr[b : b + 1].expand(len(cands), -1)}
        keep = max(len(t) for t in cands)  # left-padded: the titles are the last tokens
        logits = llm(**batch, logits_to_keep=last_positions(keep + 1), **kwargs).logits[
            :, :-1
        ]  # position j predicts j + 1
        targets = torch.zeros((len(cands), keep), dtype=torch.long, device=device)
        mask = torch.zeros_like(targets)
        for i, t in enumerate(cands):
            targets[i, keep - len(t) :] = torch.tensor(t, device=device)
            mask[i, keep - len(t) :] = 1
        rows.append(_mean_token_logprob(logits, targets, mask))
    return torch.stack(rows)


# --------------------------------------------------------------------------- generate and match
# iLoRA's own evaluation: the LLM writes its answer (greedy), the answer is matched to one of the
# prompt's candidates; HR@1 over the valid answers and ValidRatio (the share of answers that name
# a candidate) are reported beside the likelihood ranking, for comparability with its paper.


@torch.inference_mode()
def greedy_answers(
    llm,
    collator: PromptCollator,
    prompt_ids: list[list[int]],
    max_new_tokens: int,
    stop_ids=(),
    crm_repr: torch.Tensor | None = None,
) -> list[list[int]]:
    """Greedy continuations (token ids, the stop token excluded) of left-padded prompts, the
    prompts' key/value cache extended one token per step; `crm_repr` routes a gated model."""
    device = next(llm.parameters()).device
    prefix = {k: v.to(device) for k, v in collator.pad(prompt_ids).items()}
    out = llm(**prefix, use_cache=True, logits_to_keep=last_positions(1), **_llm_kwargs(crm_repr))
    cache, mask = out.cache, prefix["attention_mask"]
    position = mask.sum(-1)  # the next token's position: real tokens only, as in the prompt
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    done = torch.zeros(len(prompt_ids), dtype=torch.bool, device=device)
    steps = []
    for step in range(max_new_tokens):
        token = out.logits[:, -1, :].float().argmax(-1)
        steps.append(token)
        done |= torch.isin(token, stop)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        out = llm(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=position[:, None],
            cache=cache,
            use_cache=True,
            **_llm_kwargs(crm_repr),
        )
        position = position + 1
    answers = []
    for row in torch.stack(steps, dim=1).tolist():
        cut = next((i for i, t in enumerate(row) if t in set(stop_ids)), len(row))
        answers.append(row[:cut])
    return answers


_YEAR = re.compile(r"\s*\((?:\d{4}|\d{4}\s*[-–]\s*\d{0,4})\)\s*$")


def normalize_title(text: str) -> str:
    """Case, Unicode form, quotes and emphasis, surrounding punctuation and inner whitespace folded."""
    text = unicodedata.normalize("NFKC", str(text)).strip().lower()
    text = re.sub(r"\s+", " ", text)
    return text.strip(" \t\"'`*_.,;:!").strip()


def _answer_line(text: str) -> str:
    """The answer's first non-empty line, less a leading 'answer:' the model may repeat."""
    line = next((part for part in str(text).splitlines() if part.strip()), "")
    return re.sub(r"^\s*(?:the\s+)?answer\s*(?:is)?\s*[:\-]?\s*", "", line, flags=re.IGNORECASE)


def match_answer(generated: str, titles, fuzzy_cutoff: float = 0.9) -> int:
    """The index of the candidate a generated answer names, -1 when it names none (invalid).

    Rules, in order, each accepted only when it picks one candidate:
    1. the normalized answer (first line, `normalize_title`) equals a normalized title;
    2. equal with a trailing year "(1996)" dropped from both (the model wrote "Fargo");
    3. the answer contains one normalized title whole (at word boundaries; a title inside another
       contained title does not count), e.g. "I think Fargo (1996)."; two different titles: invalid;
    4. fuzzy: the best difflib ratio between the answer and a title, at least `fuzzy_cutoff` and
       strictly above the second best (a typo or a dropped article; fuzzy_cutoff >= 1 turns it off).
    """
    answer = normalize_title(_answer_line(generated))
    if not answer:
        return -1
    norm = [normalize_title(t) for t in titles]

    def unique(hits: list[int]) -> int:
        return hits[0] if len({norm[i] for i in hits}) == 1 else -1

    exact = [i for i, t in enumerate(norm) if t == answer]
    if exact:
        return exact[0]
    bare = _YEAR.sub("", answer)
    hits = [i for i, t in enumerate(norm) if _YEAR.sub("", t) == bare]
    if hits:
        return unique(hits)
    contained = [i for i, t in enumerate(norm) if t and re.search(rf"(?<!\w){re.escape(t)}(?!\w)", answer)]
    if contained:  # a title inside another contained one ("Heat" in "Heat (1995)") is not a second answer
        outer = [i for i in contained if not any(norm[i] != norm[j] and norm[i] in norm[j] for j in contained)]
        return unique(outer)
    if fuzzy_cutoff >= 1:
        return -1
    ratios = sorted(((difflib.SequenceMatcher(None, answer, t).ratio(), i) for i, t in enumerate(norm)), reverse=True)
    best, index = ratios[0]
    second = ratios[1][0] if len(ratios) > 1 else -1.0
    return index if best >= fuzzy_cutoff and best > second else -1
