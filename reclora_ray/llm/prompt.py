"""The paper's hard prompt template (Figure 2), per dataset.

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
authors ran, say "liked", which is used here.

`render` wraps the text for the model: with `llm.chat_template` as the user turn of the
tokenizer's chat template (generation prompt added), otherwise as "Input:\\n...\\nOutput:\\n".
Either way the prompt ends with a newline and the answer, "Yes." or "No.", follows it directly;
`reclora_ray.llm.base.answer_token_ids` gives the first token of each answer in that position.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

ANSWERS = ("No.", "Yes.")  # indexed by label


@dataclass(frozen=True)
class Wording:
    noun: str
    plural: str
    past: str  # "He watched ..."
    perfect: str  # "... he has watched"


MOVIES = Wording("movie", "movies", "watched", "has watched")
BOOKS = Wording("book", "books", "read", "has read")
WORDING = {"ml-100k": MOVIES, "ml-1m": MOVIES, "ml-25m": MOVIES, "goodreads": BOOKS}


def build_prompt(dataset: str, target_title: str, history_titles, history_ratings,
                 profile_text: str | None = None, gender: str | None = None) -> str:
    """The Figure 2 instruction for one sample (history oldest first)."""
    if dataset not in WORDING:
        raise ValueError(f"no prompt wording for dataset {dataset!r}; expected one of {sorted(WORDING)}")
    words = WORDING[dataset]
    who = _subject(gender)
    history = [f"{i}. {title} {format_rating(rating)}"
               for i, (title, rating) in enumerate(zip(history_titles, history_ratings))]
    lines = [profile_text.strip()] if profile_text and profile_text.strip() else []
    lines += [
        f"{who[0].upper()}{who[1:]} {words.past} the following {words.plural} in order in the past, and rated them:",
        str(history),
        f"Based on the {words.plural} {who} {words.perfect}, deduce if {who} will like the {words.noun} ***{target_title}***.",
        f"Note that more stars the user rated the {words.noun}, the user liked the {words.noun} more.",
        "You should ONLY tell me yes or no.",
    ]
    return "\n".join(lines)


def format_rating(rating: float) -> str:
    """(4 stars), (1 star), (3.5 stars), (0.5 star)."""
    return f"({float(rating):g} {'star' if rating <= 1 else 'stars'})"


def _subject(gender: str | None) -> str:
    code = (gender or "").strip().lower()[:1]
    return {"m": "he", "f": "she"}.get(code, "the user")


def render(text: str, tokenizer=None, chat_template: bool = False) -> str:
    """The model input for an instruction: chat-templated, or the plain Input/Output form."""
    if not chat_template:
        return f"Input:\n{text}\nOutput:\n"
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("llm.chat_template is true but the tokenizer has no chat template; "
                         "set --set llm.chat_template=false")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
    if not prompt.endswith("\n"):
        raise ValueError("the tokenizer's chat template does not end its generation prompt with a newline; "
                         "the answer-token lookup assumes it does (set llm.chat_template=false)")
    return prompt


class PromptBuilder:
    """Prompts for samples of one prepared dataset: titles and profiles looked up by id."""

    def __init__(self, dataset: str, items: pd.DataFrame, users: pd.DataFrame, tokenizer=None,
                 chat_template: bool = False):
        if dataset not in WORDING:
            raise ValueError(f"no prompt wording for dataset {dataset!r}; expected one of {sorted(WORDING)}")
        self.dataset = dataset
        self.titles = items.sort_values("item_id")["title"].to_numpy(dtype=object)
        users = users.sort_values("user_id")
        self.profiles = _optional_column(users, "profile_text")
        self.genders = _optional_column(users, "gender")
        self.tokenizer = tokenizer
        self.chat_template = chat_template

    @classmethod
    def from_prepared(cls, data, tokenizer=None, chat_template: bool = False) -> "PromptBuilder":
        return cls(data.dataset, data.items, data.users, tokenizer, chat_template)

    def prompt(self, user_id: int, item_id: int, hist_item_ids, hist_ratings) -> str:
        """One rendered prompt; the history may be -1 padded (padding is skipped). A user id
        outside the prepared users (an online cold-start user) has no profile."""
        hist_item_ids = np.asarray(hist_item_ids)
        keep = hist_item_ids >= 0
        known = 0 <= user_id < len(self.profiles)
        text = build_prompt(
            self.dataset, self.titles[item_id], self.titles[hist_item_ids[keep]], np.asarray(hist_ratings)[keep],
            self.profiles[user_id] if known else None, self.genders[user_id] if known else None,
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
    stats = {"n": len(lengths), "mean": float(lengths.mean()), "p50": float(np.percentile(lengths, 50)),
             "p95": float(np.percentile(lengths, 95)), "max": int(lengths.max())}
    log.info("%s: %d, tokens mean %.0f, p50 %.0f, p95 %.0f, max %d", what, stats["n"], stats["mean"],
             stats["p50"], stats["p95"], stats["max"])
    return stats
