import numpy as np
import pandas as pd
import pytest

from reclora_ray.base_model import load_base
from reclora_ray.config import load_config
from reclora_ray.data.prepared import Sequences
from reclora_ray.llm.base import answer_token_ids
from reclora_ray.llm.prompt import PromptBuilder, build_prompt, log_length_stats, render

ITEMS = pd.DataFrame(
    {
        "item_id": [0, 1, 2, 3],
        "title": ["Toy Story (1995)", "Devil's Own, The (1997)", "Crying Game, The (1992)", "Titanic (1997)"],
    }
)


def builder(dataset, profile=None, gender=None, **kwargs):
    users = pd.DataFrame({"user_id": [0], "profile_text": [profile]})
    if gender is not None:
        users["gender"] = [gender]
    return PromptBuilder(dataset, ITEMS, users, **kwargs)


def instruction(dataset, ratings, profile=None, gender=None):
    return build_prompt(dataset, "Titanic (1997)", ITEMS["title"][:3], ratings, profile, gender)


def test_ml100k_golden():
    assert instruction("ml-100k", [4, 5, 1], "The user is a male. His job is technician. His age is 24.", "male") == (
        "The user is a male. His job is technician. His age is 24.\n"
        "He watched the following movies in order in the past, and rated them:\n"
        "['0. Toy Story (1995) (4 stars)', \"1. Devil's Own, The (1997) (5 stars)\", '2. Crying Game, The (1992) (1 star)']\n"
        "Based on the movies he has watched, deduce if he will like the movie ***Titanic (1997)***.\n"
        "Note that more stars the user rated the movie, the user liked the movie more.\n"
        "You should ONLY tell me yes or no."
    )


def test_ml1m_golden_through_the_builder():
    prompts = builder("ml-1m", "The user is a female. Her job is writer. Her age is 35-44.", "F").prompts(
        [0], [3], np.array([[-1, 0, 2]]), np.array([[0, 2.0, 3.0]])
    )
    assert prompts == [
        "Input:\n"
        "The user is a female. Her job is writer. Her age is 35-44.\n"
        "She watched the following movies in order in the past, and rated them:\n"
        "['0. Toy Story (1995) (2 stars)', '1. Crying Game, The (1992) (3 stars)']\n"
        "Based on the movies she has watched, deduce if she will like the movie ***Titanic (1997)***.\n"
        "Note that more stars the user rated the movie, the user liked the movie more.\n"
        "You should ONLY tell me yes or no.\n"
        "Output:\n"
    ]


def test_ml25m_golden_no_profile_half_stars():
    assert builder("ml-25m").prompt(0, 3, [1, 0], [3.5, 0.5]) == (
        "Input:\n"
        "The user watched the following movies in order in the past, and rated them:\n"
        "[\"0. Devil's Own, The (1997) (3.5 stars)\", '1. Toy Story (1995) (0.5 star)']\n"
        "Based on the movies the user has watched, deduce if the user will like the movie ***Titanic (1997)***.\n"
        "Note that more stars the user rated the movie, the user liked the movie more.\n"
        "You should ONLY tell me yes or no.\n"
        "Output:\n"
    )


def test_goodreads_golden_books():
    books = pd.DataFrame({"item_id": [0, 1], "title": ["Dune", "The Hobbit"]})
    users = pd.DataFrame({"user_id": [0], "profile_text": [""]})
    assert PromptBuilder("goodreads", books, users).prompt(0, 0, [1], [5]) == (
        "Input:\n"
        "The user read the following books in order in the past, and rated them:\n"
        "['0. The Hobbit (5 stars)']\n"
        "Based on the books the user has read, deduce if the user will like the book ***Dune***.\n"
        "Note that more stars the user rated the book, the user liked the book more.\n"
        "You should ONLY tell me yes or no.\n"
        "Output:\n"
    )


def test_unknown_dataset():
    with pytest.raises(ValueError, match="no prompt wording for dataset 'amazon'"):
        build_prompt("amazon", "x", [], [])


def test_chat_template_and_answer_position():
    _, tokenizer = load_base(load_config("tiny").llm)
    text = instruction("ml-100k", [4, 5, 1])
    chat = render(text, tokenizer, chat_template=True)
    assert chat.startswith("<|user|>\n" + text) and chat.endswith("<|assistant|>\n")
    yes, no = answer_token_ids(tokenizer)
    for prompt in (chat, render(text)):
        n = len(tokenizer(prompt)["input_ids"])
        assert tokenizer(prompt + "Yes.")["input_ids"][n] == yes
        assert tokenizer(prompt + "No.")["input_ids"][n] == no
    tokenizer.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        render(text, tokenizer, chat_template=True)


def test_for_samples_reads_the_sequences_and_length_stats_grow():
    offsets = np.array([0, 4])
    sequences = Sequences(
        offsets,
        np.array([0, 1, 2, 3], np.int32),
        np.array([4, 5, 1, 2], np.float32),
        np.zeros(4, np.int8),
        np.arange(4),
    )
    b = builder("ml-100k", "The user is a male.", "M")
    short, long = b.for_samples(sequences, [0, 0], [3, 3], np.array([[-1, -1, 2], [0, 1, 2]]))
    assert "['0. Crying Game, The (1992) (1 star)']" in short
    assert "'2. Crying Game, The (1992) (1 star)'" in long and "He watched" in long
    _, tokenizer = load_base(load_config("tiny").llm)
    assert log_length_stats(tokenizer, [long])["mean"] > log_length_stats(tokenizer, [short])["mean"]


def test_a_user_outside_the_prepared_users_gets_no_profile():
    known = builder("ml-1m", "The user is a female. Her job is writer. Her age is 35-44.", "F")
    empty = np.array([], dtype=np.int64)
    assert known.prompt(1, 3, empty, empty) == builder("ml-1m").prompt(0, 3, empty, empty)  # the cold-start wording
    assert "female" not in known.prompt(7, 3, [0], [4.0])
