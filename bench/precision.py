"""fp32 against llm.dtype auto (bf16 on a CPU with AVX512-BF16 or AMX) on the quickstart's real
prompts and the packaged SmolLM2-135M-Instruct, each pair timed in one run, alternating.

  scoring    prompts/s through the Scorer a `reclora score` actor runs (goal: auto >= 3x fp32)
  tuning     samples/s of forward + backward + AdamW step of the RecLoRA adapter (goal >= 2x)
  embedding  items/s of the item encoder (`reclora embed`'s actor)
  parity     with --run OUT holding a tuned adapter: the same adapter scored in fp32 and in auto
             on the same --parity-samples test samples: |dAUC| (goal <= 0.003), Spearman of
             P(yes) (goal >= 0.99)

One torch thread per measurement, as each Ray actor or Ray Train worker gets one CPU.

    python bench/precision.py --run runs/quickstart                      # needs prepare..retrieve + CRM
    python bench/precision.py --run runs/quickstart --parity-samples 2000  # + the tuned adapter

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reclora_ray.base_model import dtype_name, resolve_dtype, use_cpu_eager_attention  # noqa: E402
from reclora_ray.config import load_config  # noqa: E402
from reclora_ray.data.prepared import PreparedData  # noqa: E402
from reclora_ray.llm.histories import load_samples  # noqa: E402
from reclora_ray.llm.inputs import InputBuilder, to_device  # noqa: E402
from reclora_ray.llm.model import build_model, causal_lm, training_loss  # noqa: E402
from reclora_ray.llm.score import Scorer, llm_test_rows  # noqa: E402
from reclora_ray.metrics import binary_metrics  # noqa: E402
from reclora_ray.rundir import RunDir  # noqa: E402
from reclora_ray.variants import get_variant  # noqa: E402

log = logging.getLogger("precision")


def scorer_for(cfg, run, data, variant, adapter: bool) -> Scorer:
    model, tokenizer, spec = build_model(cfg, run, variant, run.adapter(variant.name) if adapter else None)
    return Scorer.from_model(
        model, InputBuilder(cfg, data, variant, tokenizer, spec), data, torch.device("cpu"), cfg.score.batch_size
    )


def time_scoring(scorer: Scorer, rows) -> float:
    scorer(rows.iloc[:4])  # warm-up
    start = time.perf_counter()
    scorer(rows)
    return len(rows) / (time.perf_counter() - start)


def time_tuning(cfg, run, data, variant, rows, steps: int) -> float:
    torch.manual_seed(0)
    model, tokenizer, spec = build_model(cfg, run, variant)
    use_cpu_eager_attention(causal_lm(model.llm), torch.device("cpu"))  # as the tuning workers do
    inputs = InputBuilder(cfg, data, variant, tokenizer, spec)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.tune.lr)
    mb = cfg.tune.micro_batch
    model.train()

    def step(i: int) -> None:
        batch = to_device(inputs.training_batch(rows.iloc[i * mb : (i + 1) * mb]), "cpu")
        crm_repr = model.crm_repr(batch.pop("crm_features"))
        training_loss(model.llm, batch, crm_repr, cfg.tune.loss, inputs.collator.yes_no).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(0)  # warm-up
    start = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    return steps * mb / (time.perf_counter() - start)


def time_embedding(cfg, data, n_items: int) -> float:
    from reclora_ray.retrieval.embed import ItemEncoder, encoder_config

    encoder = ItemEncoder(encoder_config(cfg), cfg.embed.pooling, cfg.embed.max_length)
    items = data.items[["item_id", "text"]].iloc[:n_items]
    encoder(items.iloc[:8])
    start = time.perf_counter()
    for i in range(0, len(items), cfg.embed.batch_size):
        encoder(items.iloc[i : i + cfg.embed.batch_size])
    return len(items) / (time.perf_counter() - start)


def cpu_model() -> str:
    """The CPU's model name and its bf16 instruction sets, as /proc/cpuinfo gives them."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = [flag for flag in ("avx512_bf16", "amx_bf16") if flag in info]
    return f"{name} ({', '.join(flags) or 'no bf16 instructions'})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a quickstart run directory (data, retrieval, CRM)")
    parser.add_argument("--config", default="quickstart")
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--tune-steps", type=int, default=6)
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--parity-samples", type=int, default=0, help="0: skip the parity check")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(1)

    run = RunDir(args.run)
    auto_cfg = load_config(args.config)
    data = PreparedData.load(run.data, expect_dataset=auto_cfg.data.dataset)
    resolved = dtype_name(resolve_dtype(auto_cfg.llm.dtype, torch.device("cpu")))
    configs = {"fp32": load_config(args.config, ["llm.dtype=float32"]), "auto": auto_cfg}
    variant = get_variant("reclora")
    test = load_samples(run.data, "test", variant)
    rows = test.sample(n=args.prompts, random_state=0).reset_index(drop=True)
    train = (
        load_samples(run.data, "train", variant)
        .sample(n=(args.tune_steps + 1) * auto_cfg.tune.micro_batch, random_state=0)
        .reset_index(drop=True)
    )
    rates: dict[str, dict[str, float]] = {"scoring": {}, "tuning": {}, "embedding": {}}
    for name, cfg in configs.items():  # untuned adapters: the cost is the same as a tuned one's
        rates["scoring"][name] = time_scoring(scorer_for(cfg, run, data, variant, adapter=False), rows)
        rates["tuning"][name] = time_tuning(cfg, run, data, variant, train, args.tune_steps)
        rates["embedding"][name] = time_embedding(cfg, data, args.items)
        log.info("%s: %s", name, {k: round(v[name], 2) for k, v in rates.items()})
    result = {
        "cpu": cpu_model(),
        "cpu_bf16_dtype": resolved,
        "threads": 1,
        "prompts": len(rows),
        "tune_samples": args.tune_steps * auto_cfg.tune.micro_batch,
        "items": args.items,
    }
    for what, pair in rates.items():
        result[f"{what}_fp32_per_s"] = round(pair["fp32"], 2)
        result[f"{what}_auto_per_s"] = round(pair["auto"], 2)
        result[f"{what}_speedup"] = round(pair["auto"] / pair["fp32"], 2)

    if args.parity_samples:
        from scipy.stats import spearmanr

        cfg = (
            auto_cfg
            if auto_cfg.score.llm_subsample is None
            else dataclasses.replace(
                auto_cfg, score=dataclasses.replace(auto_cfg.score, llm_subsample=args.parity_samples)
            )
        )
        sample = llm_test_rows(cfg, test).iloc[: args.parity_samples]
        probs = {
            name: scorer_for(c, run, data, variant, adapter=True)(sample)["p_yes"].to_numpy()
            for name, c in configs.items()
        }
        auc = {name: binary_metrics(sample["label"].to_numpy(), p)["auc"] for name, p in probs.items()}
        result.update(
            {
                "parity_samples": len(sample),
                "parity_auc_fp32": round(auc["fp32"], 4),
                "parity_auc_auto": round(auc["auto"], 4),
                "parity_abs_delta_auc": round(abs(auc["auto"] - auc["fp32"]), 4),
                "parity_spearman": round(float(spearmanr(probs["fp32"], probs["auto"]).statistic), 4),
                "parity_max_abs_diff_p_yes": round(float(np.abs(probs["fp32"] - probs["auto"]).max()), 4),
            }
        )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
