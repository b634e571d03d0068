"""Natural-language descriptions of items and users from templates with named fields.

A template is a list of parts; each part is a `str.format` string naming fields of the row
("Here is a movie. Its title is {title}.", " The movie's genre is {genres}."). A part that names
a missing or empty field is left out, list fields are joined with ", ". The presets below are
the paper's Figure 2 / ReLLa wording; `data.text.description` / `data.text.profile` replace them.

Pure ID fields (user id, item id, zip code) never enter the default text: LLMs read them poorly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from reclora_ray.config import template_fields

YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")

MOVIE_DESCRIPTION = ("Here is a movie. Its title is {title}.", " The movie's genre is {genres}.")
BOOK_DESCRIPTION = ("Here is a book. Its title is {title}.", " Its authors are {authors}.", " Its genres are {genres}.")
ITEM_DESCRIPTION = ("Here is an item. Its title is {title}.", " {details}")


def year_from_title(title: str) -> int | None:
    """MovieLens writes the release year at the end of the title: "Titanic (1997)"."""
    match = YEAR_IN_TITLE.search(title or "")
    return int(match.group(1)) if match else None


def _value(value) -> str:
    if value is None or (not isinstance(value, (list, tuple, np.ndarray)) and pd.isna(value)):
        return ""
    if isinstance(value, (list, tuple, np.ndarray)):
        return ", ".join(str(v) for v in value if v is not None and str(v) != "")
    return str(value).strip()


def fill(parts, fields: dict) -> str:
    """The parts whose named fields are all non-empty, joined; a field the row lacks is empty."""
    out = []
    for part in parts:
        names = template_fields(part)
        values = {name: _value(fields.get(name)) for name in names}
        if all(values.values()):
            out.append(part.format(**values))
    return "".join(out)


def check_fields(parts, available, what: str, key: str) -> None:
    """Stop before any work when a template names a field the table does not have."""
    unknown = sorted({n for part in parts for n in template_fields(part)} - set(available))
    if unknown:
        raise ValueError(f"data.text.{key}: {unknown} are not fields of the {what} (fields: {sorted(available)})")


def descriptions(items: pd.DataFrame, parts) -> list[str]:
    check_fields(parts, items.columns, "items table", "description")
    return [fill(parts, row) for row in items.to_dict("records")]


def default_description(kind: str) -> tuple[str, ...]:
    return {"movie": MOVIE_DESCRIPTION, "book": BOOK_DESCRIPTION}.get(kind, ITEM_DESCRIPTION)


def profile_text(gender: str | None, age: str | None, occupation: str | None) -> str:
    """ "The user is a male. His job is writer. His age is 35-45." Unknown parts are left out;
    a dataset without profiles (ML-25M, GoodReads) gets the empty string."""
    if gender == "male":
        parts, pronoun = ["The user is a male."], "His"
    elif gender == "female":
        parts, pronoun = ["The user is a female."], "Her"
    else:
        parts, pronoun = [], "Their"
    if occupation:
        parts.append(f"{pronoun} job is {occupation}.")
    if age:
        parts.append(f"{pronoun} age is {age}.")
    return " ".join(parts)


def add_profile_text(users: pd.DataFrame, parts=None) -> pd.DataFrame:
    """users.profile_text from `parts` (data.text.profile), or Figure 2's sentence."""
    if parts is not None:
        check_fields(parts, users.columns, "users table", "profile")
        users["profile_text"] = [fill(parts, row) for row in users.to_dict("records")]
        return users

    def column(name: str) -> list:
        if name not in users:
            return [None] * len(users)
        return [None if pd.isna(v) else v for v in users[name].tolist()]

    users["profile_text"] = [
        profile_text(g, a, o) for g, a, o in zip(column("gender"), column("age"), column("occupation"))
    ]
    return users


# --------------------------------------------------------------------------- prompt wording
# The benchmarks' prompts (the paper's Figure 2) and the generic log's; reclora_ray/llm/prompt.py renders them.


@dataclass(frozen=True)
class PromptTemplates:
    """A prompt as templates (data.text.prompt / history_item): each line is rendered with
    {profile} {Subject} {subject} {history} {title}, and dropped when it renders empty (no profile);
    a history entry with {index} {title} {rating} {stars}; {history} is the entries as a Python list."""

    lines: tuple[str, ...]
    history_item: str


def figure2(noun: str, plural: str, past: str, perfect: str) -> PromptTemplates:
    return PromptTemplates(
        (
            "{profile}",
            f"{{Subject}} {past} the following {plural} in order in the past, and rated them:",
            "{history}",
            f"Based on the {plural} {{subject}} {perfect}, deduce if {{subject}} will like the {noun} ***{{title}}***.",
            f"Note that more stars the user rated the {noun}, the user liked the {noun} more.",
            "You should ONLY tell me yes or no.",
        ),
        "{index}. {title} ({stars})",
    )


MOVIES = figure2("movie", "movies", "watched", "has watched")
BOOKS = figure2("book", "books", "read", "has read")
RATED_ITEMS = figure2("item", "items", "interacted with", "has interacted with")
CLICKED_ITEMS = PromptTemplates(
    (
        "{profile}",
        "{Subject} clicked the following items in order in the past:",
        "{history}",
        "Based on the items {subject} has clicked, deduce if {subject} will like the item ***{title}***.",
        "You should ONLY tell me yes or no.",
    ),
    "{index}. {title}",
)
WORDING = {"ml-100k": MOVIES, "ml-1m": MOVIES, "ml-25m": MOVIES, "goodreads": BOOKS}
