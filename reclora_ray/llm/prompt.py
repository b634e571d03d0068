"""The prompt: the paper's hard template (Figure 2) for the benchmarks, any template via data.text.

    The user is a male. His job is writer. His age is 35-45.
    He watched the following movies in order in the past, and rated them:
    ['0. Pump Up the Volume (1990) (4 stars)', '1. Antz (1998) (4 stars)', ...]
    Based on the movies he has watched, deduce if he will like the movie ***Titanic (1997)***.
    Note that more stars the user rated the movie, the user liked the movie more.
    You should ONLY tell me yes or no.

The profile sentence is users.profile_text (no pure ID fields; ML-25M and GoodReads have no
profile, and the sentence is left out); the history is the sample's short history, oldest first,
numbered from 0 and written as a Python list, as in Figure 2 and ReLLa's code; books read where
movies are watched. Figure 2 prints "the user like the movie more"; ReLLa's templates, which the
authors ran, say "liked", which is used here. `data.text.prompt` / `history_item` replace the
wording (meta.json carries them from prepare); a generic log reads "items", and one without
ratings (clicks) gets no stars.

`render` wraps the text for the model: with `llm.chat_template` as the user turn of the
tokenizer's chat template (generation prompt added), otherwise as "Input:\\n...\\nOutput:\\n".
Either way the prompt ends with a newline and the answer, "Yes." or "No.", follows it directly;
`reclora_ray.llm.base.answer_token_ids` gives the first token of each answer in that position.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from reclora_ray.config import HISTORY_FIELDS, PROMPT_FIELDS, template_fields
from reclora_ray.data.text import CLICKED_ITEMS, RATED_ITEMS, WORDING, PromptTemplates

log = logging.getLogger(__name__)

ANSWERS = ("No.", "Yes.")  # indexed by label


def templates_for(dataset: str, rated: bool = True, lines=None, history_item=None) -> PromptTemplates:
    """The dataset's wording (Figure 2 for the benchmarks), with any configured template in its place."""
    if dataset in WORDING:
        preset = WORDING[dataset]
    elif dataset == "interactions":
        preset = RATED_ITEMS if rated else CLICKED_ITEMS
    else:
        raise ValueError(
            f"no prompt wording for dataset {dataset!r}; expected one of {sorted(WORDING)} or interactions"
        )
    chosen = PromptTemplates(tuple(lines) if lines else preset.lines, history_item or preset.history_item)
    for key, parts, allowed in (
        ("prompt", chosen.lines, PROMPT_FIELDS),
        ("history_item", [chosen.history_item], HISTORY_FIELDS),
    ):
        unknown = sorted({n for part in parts for n in template_fields(part)} - set(allowed))
        if unknown:
            raise ValueError(f"data.text.{key}: unknown fields {unknown}; available: {', '.join(allowed)}")
    return chosen


def build_prompt(
    dataset: str | PromptTemplates,
    target_title: str,
    history_titles,
    history_ratings,
    profile_text: str | None = None,
    gender: str | None = None,
) -> str:
    """The instruction for one sample (history oldest first): Figure 2 for a benchmark name."""
    words = dataset if isinstance(dataset, PromptTemplates) else templates_for(dataset)
    who = _subject(gender)
    history = [
        words.history_item.format(index=i, title=title, rating=f"{float(rating):g}", stars=stars(rating))
        for i, (title, rating) in enumerate(zip(history_titles, history_ratings))
    ]
    values = {
        "profile": (profile_text or "").strip(),
        "Subject": f"{who[0].upper()}{who[1:]}",
        "subject": who,
        "history": str(history),
        "title": target_title,
    }
    lines = [line.format(**values) for line in words.lines]
    return "\n".join(line for line in lines if line.strip())


def stars(rating: float) -> str:
    """4 stars, 1 star, 3.5 stars, 0.5 star."""
    return f"{float(rating):g} {'star' if rating <= 1 else 'stars'}"


def format_rating(rating: float) -> str:
    """(4 stars), (1 star), (3.5 stars), (0.5 star)."""
    return f"({stars(rating)})"


def _subject(gender: str | None) -> str:
    code = (gender or "").strip().lower()[:1]
    return {"m": "he", "f": "she"}.get(code, "the user")


def render(text: str, tokenizer=None, chat_template: bool = False) -> str:
    """The model input for an instruction: chat-templated, or the plain Input/Output form."""
    if not chat_template:
        return f"Input:\n{text}\nOutput:\n"
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "llm.chat_template is true but the tokenizer has no chat template; set --set llm.chat_template=false"
        )
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    if not prompt.endswith("\n"):
        raise ValueError(
            "the tokenizer's chat template does not end its generation prompt with a newline; "
            "the answer-token lookup assumes it does (set llm.chat_template=false)"
        )
    return prompt


class PromptBuilder:
    """Prompts for samples of one prepared dataset: titles and profiles looked up by id."""

    def __init__(
        self,
        dataset: str,
        items: pd.DataFrame,
        users: pd.DataFrame,
        tokenizer=None,
        chat_template: bool = False,
        templates: PromptTemplates | None = None,
    ):
        self.dataset = dataset
        self.templates = templates or templates_for(dataset)
        self.titles = items.sort_values("item_id")["title"].to_numpy(dtype=object)
        users = users.sort_values("user_id")
        self.profiles = _optional_column(users, "profile_text")
        self.genders = _optional_column(users, "gender")
        self.tokenizer = tokenizer
        self.chat_template = chat_template

    @classmethod
    def from_prepared(cls, data, tokenizer=None, chat_template: bool = False) -> "PromptBuilder":
        text = data.meta.get("text") or {}  # prepared before templates existed: the dataset's wording
        templates = templates_for(
            data.dataset, data.meta.get("rated", True), text.get("prompt"), text.get("history_item")
        )
        return cls(data.dataset, data.items, data.users, tokenizer, chat_template, templates)

    def prompt(self, user_id: int, item_id: int, hist_item_ids, hist_ratings) -> str:
        """One rendered prompt; the history may be -1 padded (padding is skipped). A user id
        outside the prepared users (an online cold-start user) has no profile."""
        hist_item_ids = np.asarray(hist_item_ids)
        keep = hist_item_ids >= 0
        known = 0 <= user_id < len(self.profiles)
        text = build_prompt(
            self.templates,
            self.titles[item_id],
            self.titles[hist_item_ids[keep]],
            np.asarray(hist_ratings)[keep],
            self.profiles[user_id] if known else None,
            self.genders[user_id] if known else None,
        )
        return render(text, self.tokenizer, self.chat_template)

    def prompts(self, user_ids, item_ids, hist_item_ids, hist_ratings) -> list[str]:
        """Prompts for a batch; hist_item_ids / hist_ratings are (n, K), -1 padded item ids."""
        return [self.prompt(u, i, h, r) for u, i, h, r in zip(user_ids, item_ids, hist_item_ids, hist_ratings)]

    def for_samples(self, sequences, user_ids, item_ids, hist_short) -> list[str]:
        """Prompts for samples given their short histories as indices into the users'
        sequences ((n, K), -1 padded, as `load_retrieval(...).hist_short`)."""
        user_ids = np.asarray(user_ids, dtype=np.int64)
        hist_items = sequences.gather(user_ids, hist_short, "item_ids")
        hist_ratings = sequences.gather(user_ids, hist_short, "ratings")
        return self.prompts(user_ids, item_ids, hist_items, hist_ratings)


def _optional_column(frame: pd.DataFrame, column: str) -> np.ndarray:
    if column not in frame:
        return np.full(len(frame), None, dtype=object)
    values = frame[column].astype(object).to_numpy()
    return np.where(pd.isna(values), None, values)


def log_length_stats(tokenizer, prompts: list[str], what: str = "prompts") -> dict:
    """Token counts of the prompts (mean, p50, p95, max), logged so a history length's cost shows."""
    if not prompts:
        return {"n": 0}
    lengths = np.array([len(ids) for ids in tokenizer(list(prompts))["input_ids"]])
    stats = {
        "n": len(lengths),
        "mean": float(lengths.mean()),
        "p50": float(np.percentile(lengths, 50)),
        "p95": float(np.percentile(lengths, 95)),
        "max": int(lengths.max()),
    }
    log.info(
        "%s: %d, tokens mean %.0f, p50 %.0f, p95 %.0f, max %d",
        what,
        stats["n"],
        stats["mean"],
        stats["p50"],
        stats["p95"],
        stats["max"],
    )
    return stats
