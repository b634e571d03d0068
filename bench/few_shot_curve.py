"""Few-shot learning curves: validation AUC of each LLM variant against the few-shot set size
and the learning rate, on a run directory whose data, retrieval and CRM are done.

Answers "how many few-shot samples, which lr" before a cluster run, and checks that tuning
learns at all. One process, no Ray and no DeepSpeed: the same model (`build_model`), inputs
(`InputBuilder.training_batch`), few-shot draw (`few_shot_sample`), optimizer (AdamW, linear
warm-up/decay, gradient clipping 1.0, as `deepspeed_config`) and scorer (`Scorer`) as the
stages, on one device. Scored on a fixed random subsample of the validation split, never on
test: what this picks must not be chosen on the test split.

    python bench/few_shot_curve.py --run runs/quickstart --config quickstart \\
        --few-shot 256 1024 --lr 1e-3 3e-3 --variants zero-shot rella reclora --device cuda

Last line: one JSON object {"curve": [{"variant", "few_shot", "lr", "steps", "auc", "logloss",
"train_s"}, ...], ...}.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reclora_ray.config import load_config  # noqa: E402
from reclora_ray.data.prepared import PreparedData  # noqa: E402
from reclora_ray.llm.histories import load_samples  # noqa: E402
from reclora_ray.llm.inputs import InputBuilder, to_device  # noqa: E402
from reclora_ray.llm.model import build_model, training_loss  # noqa: E402
from reclora_ray.llm.score import Scorer  # noqa: E402
from reclora_ray.llm.tune import few_shot_sample, lr_schedule  # noqa: E402
from reclora_ray.metrics import binary_metrics  # noqa: E402
from reclora_ray.rundir import RunDir  # noqa: E402
from reclora_ray.variants import get_variant  # noqa: E402

log = logging.getLogger("few_shot_curve")


def tune_once(cfg, run, data, variant, train, device) -> tuple[torch.nn.Module, InputBuilder, int, float]:
    """A fresh adapter tuned on `train`: (model, inputs, optimizer steps, seconds)."""
    torch.manual_seed(cfg.run.seed)
    model, tokenizer, crm_spec = build_model(cfg, run, variant, device=device)
    inputs = InputBuilder(cfg, data, variant, tokenizer, crm_spec)
    if variant.adapter is None:
        return model, inputs, 0, 0.0
    t = cfg.tune
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=t.lr, weight_decay=t.weight_decay)
    per_epoch = len(train) // (t.micro_batch * t.grad_accum)
    total = max(1, per_epoch) * t.epochs
    scheduler = lr_schedule(cfg, total)(optimizer)  # the tune stage's own schedule
    rng = np.random.default_rng(cfg.run.seed)
    start, steps = time.perf_counter(), 0
    model.train()
    for epoch in range(t.epochs):
        order = rng.permutation(len(train))
        losses = []
        for i in range(0, per_epoch * t.micro_batch * t.grad_accum, t.micro_batch):
            batch = to_device(inputs.training_batch(train.iloc[order[i : i + t.micro_batch]]), device)
            crm_repr = model.crm_repr(batch.pop("crm_features"))
            loss = training_loss(model.llm, batch, crm_repr, t.loss, inputs.collator.yes_no) / t.grad_accum
            loss.backward()
            losses.append(loss.item() * t.grad_accum)
            if len(losses) % t.grad_accum == 0:
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                steps += 1
        log.info(
            "%s, %d samples, lr %g: epoch %d loss %.4f",
            variant.name,
            len(train),
            t.lr,
            epoch,
            float(np.mean(losses)) if losses else float("nan"),
        )
    return model, inputs, steps, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run directory with data, retrieval and the CRM(s)")
    parser.add_argument("--config", default="quickstart")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--variants", nargs="+", default=["zero-shot", "tallrec", "rella", "reclora"])
    parser.add_argument("--few-shot", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--lr", nargs="+", type=float, default=[1e-3])
    parser.add_argument("--valid", type=int, default=1000, help="validation samples scored per point")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.backends.cuda.matmul.allow_tf32 = True

    device = torch.device(args.device)
    base_cfg = load_config(args.config, args.overrides)
    run = RunDir(args.run)
    data = PreparedData.load(run.data, expect_dataset=base_cfg.data.dataset)
    curve = []
    for name in args.variants:
        variant = get_variant(name)
        train_all = load_samples(run.data, "train", variant)
        valid = load_samples(run.data, "valid", variant)
        valid = valid.sample(n=min(args.valid, len(valid)), random_state=base_cfg.run.seed).reset_index(drop=True)
        points = [(0, 0.0)] if variant.adapter is None else [(n, lr) for n in args.few_shot for lr in args.lr]
        for few_shot, lr in points:
            cfg = load_config(args.config, args.overrides + [f"tune.lr={lr or base_cfg.tune.lr}"])
            train = few_shot_sample(train_all, few_shot, cfg.run.seed)
            model, inputs, steps, train_s = tune_once(cfg, run, data, variant, train, device)
            preds = Scorer.from_model(model, inputs, data, device, cfg.score.batch_size)(valid)
            metrics = binary_metrics(preds["label"].to_numpy(), preds["p_yes"].to_numpy())
            point = {
                "variant": variant.name,
                "few_shot": len(train) if variant.adapter else 0,
                "lr": lr if variant.adapter else None,
                "steps": steps,
                "auc": round(metrics["auc"], 4),
                "logloss": round(metrics["logloss"], 4),
                "train_s": round(train_s, 1),
            }
            curve.append(point)
            print(json.dumps(point), flush=True)
            del model
    result = {
        "run": str(run.root),
        "config": args.config,
        "overrides": args.overrides,
        "device": str(device),
        "valid_samples": args.valid,
        "curve": curve,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
