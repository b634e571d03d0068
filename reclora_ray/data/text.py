"""Natural-language descriptions of items and users, as the paper's Figure 2 and ReLLa write them.

Pure ID fields (user id, item id, zip code) never enter the text: LLMs read them poorly.
"""

from __future__ import annotations

import re

import pandas as pd

YEAR_IN_TITLE = re.compile(r"\((\d{4})\)\s*$")


def year_from_title(title: str) -> int | None:
    """MovieLens writes the release year at the end of the title: "Titanic (1997)"."""
    match = YEAR_IN_TITLE.search(title or "")
    return int(match.group(1)) if match else None


def movie_text(title: str, genres: list[str]) -> str:
    text = f"Here is a movie. Its title is {title}."
    if genres:
        text += f" The movie's genre is {', '.join(genres)}."
    return text


def book_text(title: str, authors: list[str], genres: list[str]) -> str:
    text = f"Here is a book. Its title is {title}."
    if authors:
        text += f" Its authors are {', '.join(authors)}."
    if genres:
        text += f" Its genres are {', '.join(genres)}."
    return text


def profile_text(gender: str | None, age: str | None, occupation: str | None) -> str:
    """"The user is a male. His job is writer. His age is 35-45." Unknown parts are left out;
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


def add_profile_text(users: pd.DataFrame) -> pd.DataFrame:
    def column(name: str) -> list:
        if name not in users:
            return [None] * len(users)
        return [None if pd.isna(v) else v for v in users[name].tolist()]

    users["profile_text"] = [
        profile_text(g, a, o) for g, a, o in zip(column("gender"), column("age"), column("occupation"))
    ]
    return users
