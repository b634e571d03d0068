"""Prompts to model inputs: left-padded batches with explicit position ids.

Left padding puts every prompt's last token at position -1, so scoring reads one column of
logits. Position ids count only real tokens, so a prompt scores the same alone or padded in a
batch (online and batch scoring agree). Training appends the answer ("Yes." / "No.") and puts
the loss on the answer tokens only.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from reclora_ray.llm.base import answer_token_ids

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ANSWERS = {1: "Yes.", 0: "No."}


class PromptCollator:
    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.answer_ids = {
            label: tokenizer(text, add_special_tokens=False)["input_ids"] for label, text in ANSWERS.items()
        }
        self.yes_no = answer_token_ids(tokenizer)  # what scoring reads at the answer slot
        self.yes_id, self.no_id = self.yes_no
        if (self.answer_ids[1][0], self.answer_ids[0][0]) != self.yes_no:
            raise ValueError(
                f"the tokenizer starts the answers {ANSWERS[1]!r}/{ANSWERS[0]!r} with tokens "
                f"{self.answer_ids[1][0]}/{self.answer_ids[0][0]}, not the answer-slot tokens "
                f"{self.yes_no}: training and scoring would read different tokens"
            )
        self.truncated = 0

    def encode(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each prompt; too-long prompts lose their oldest tokens (counted, logged)."""
        ids = self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
        budget = self.max_length - max(len(a) for a in self.answer_ids.values())
        out = []
        for seq in ids:
            if len(seq) > budget:
                self.truncated += 1
                if self.truncated in (1, 100, 10_000):
                    log.warning(
                        "%d prompt(s) longer than %d tokens were cut from the left; "
                        "raise llm.max_length or lower retrieve.k_short",
                        self.truncated,
                        budget,
                    )
                seq = seq[-budget:]
            out.append(seq)
        return out

    def pad(self, sequences: list[list[int]], labels: list[list[int]] | None = None) -> dict[str, torch.Tensor]:
        width = max(len(s) for s in sequences)
        input_ids = np.full((len(sequences), width), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(sequences), width), dtype=np.int64)
        for i, seq in enumerate(sequences):
            input_ids[i, width - len(seq) :] = seq
            mask[i, width - len(seq) :] = 1
        position_ids = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(mask),
            "position_ids": torch.from_numpy(position_ids),
        }
        if labels is not None:
            target = np.full((len(sequences), width), IGNORE_INDEX, dtype=np.int64)
            for i, lab in enumerate(labels):
                target[i, width - len(lab) :] = lab
            batch["labels"] = torch.from_numpy(target)
        return batch

    def scoring_batch(self, prompt_ids: list[list[int]]) -> dict[str, torch.Tensor]:
        return self.pad(prompt_ids)

    def training_batch(self, prompt_ids: list[list[int]], labels) -> dict[str, torch.Tensor]:
        """Prompt + answer tokens; the loss sees only the answer (HF shifts labels itself)."""
        sequences, targets = [], []
        for seq, label in zip(prompt_ids, labels):
            answer = self.answer_ids[int(label)]
            sequences.append(list(seq) + answer)
            targets.append([IGNORE_INDEX] * len(seq) + answer)
        return self.pad(sequences, targets)


def length_buckets(lengths, batch_size: int) -> list[np.ndarray]:
    """Index groups of similar length (longest first), so each padded batch wastes little."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def p_yes(scores: torch.Tensor) -> torch.Tensor:
    """Paper Eq. 16: softmax over the (s_yes, s_no) scores at the answer slot, (batch, 2) -> (batch,)."""
    return torch.softmax(scores.float(), dim=-1)[:, 0]
