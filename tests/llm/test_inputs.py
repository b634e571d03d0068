"""Samples -> model inputs (InputBuilder), and that the answer-only loss trains the adapter."""

import numpy as np
import pytest
import torch

from reclora_ray.data.prepared import PreparedData
from reclora_ray.llm.collate import IGNORE_INDEX, p_yes
from reclora_ray.llm.histories import load_samples
from reclora_ray.llm.inputs import InputBuilder
from reclora_ray.llm.model import build_model
from reclora_ray.rundir import RunDir
from reclora_ray.variants import get_variant
from tests.conftest import tiny_config

pytestmark = pytest.mark.ray  # tiny_upstream runs the real upstream stages on a local Ray


@pytest.fixture(scope="module")
def reclora(tiny_upstream):
    cfg = tiny_config()
    run = RunDir(tiny_upstream)
    variant = get_variant("reclora")
    model, tokenizer, spec = build_model(cfg, run, variant)
    data = PreparedData.load(run.data)
    rows = load_samples(run.data, "train", variant).iloc[:16].reset_index(drop=True)
    return model, tokenizer, InputBuilder(cfg, data, variant, tokenizer, spec), rows


def test_training_batch_puts_the_loss_on_the_answer_only(reclora):
    _, tokenizer, inputs, rows = reclora
    batch = inputs.training_batch(rows)
    for i, label in enumerate(rows["label"]):
        answer = tokenizer("Yes." if label else "No.", add_special_tokens=False)["input_ids"]
        targets = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX].tolist()
        assert targets == answer
        assert batch["input_ids"][i, -len(answer) :].tolist() == answer  # left padded: the answer ends the row
    assert batch["crm_features"]["hist_item"].shape == (16, inputs.k_long)


def test_a_prompt_scores_the_same_alone_and_in_a_padded_batch(reclora):
    model, _, inputs, rows = reclora
    hist = inputs.histories(rows)
    args = rows["user_id"].to_numpy(), rows["item_id"].to_numpy(), rows["timestamp"].to_numpy()
    answer_ids = inputs.collator.yes_no
    together = np.zeros(len(rows))
    for index, batch in inputs.scoring_batches(*args, hist, batch_size=16):
        assert (batch["attention_mask"][:, -1] == 1).all()
        together[index] = p_yes(model.answer_scores(**batch, answer_ids=answer_ids)).numpy()
    for i in (0, 7):
        one = [a[i : i + 1] for a in args]
        ((_, batch),) = inputs.scoring_batches(*one, hist.take(np.array([i])), batch_size=1)
        assert p_yes(model.answer_scores(**batch, answer_ids=answer_ids)).item() == pytest.approx(together[i], abs=1e-5)


def test_the_adapter_fits_a_few_shot_batch(reclora):
    model, _, inputs, rows = reclora
    batch = inputs.training_batch(rows)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(not p.requires_grad for p in model.crm.parameters())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW(trainable, lr=3e-2)
    losses = []
    model.train()
    for _ in range(20):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]  # the tiny random LM learns slowly, but it learns
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
