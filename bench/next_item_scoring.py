"""Next-item scoring throughput: the shared prompt prefix against every candidate as its own sequence.

For the same test sequences (prompt + 20 candidate titles, from OUT/data/next_item/test.parquet),
timed in one run (median over --rounds, the order alternated):

  shared     `candidate_logliks`: one prefix pass per batch of prompts; the 20 titles then run
             laid end to end as one continuation on its KV cache (a block-diagonal mask)
  separate   `full_prompt_logliks`: each prompt + candidate as its own full sequence (the 20 of a
             prompt batched together): 20 forwards of the whole prompt's worth of tokens

max_abs_diff checks that both give the same length-normalised log-likelihoods. The model is
random weights of a real shape (--shape, the offline tiny tokenizer) or any `llm.model` (--model).
--attention auto is what the scoring stage uses (eager on a CPU, the model's own kernel elsewhere).

    python bench/next_item_scoring.py --data runs/quickstart/data --layers 4         # CPU
    python bench/next_item_scoring.py --data OUT/data --device cuda --dtype bfloat16 --batch-size 16 --prompts 256

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shapes import LLAMA_SHAPES, random_llama  # noqa: E402

from reclora_ray.base_model import load_base, use_cpu_eager_attention  # noqa: E402
from reclora_ray.config import load_config  # noqa: E402
from reclora_ray.data.prepared import PreparedData  # noqa: E402
from reclora_ray.llm.collate import PromptCollator  # noqa: E402
from reclora_ray.llm.next_item import NextItemInputs, candidate_logliks, full_prompt_logliks  # noqa: E402
from reclora_ray.llm.prompt import PromptBuilder  # noqa: E402

log = logging.getLogger("next_item_scoring")


def synced(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a prepared OUT/data (reclora prepare)")
    parser.add_argument("--shape", default="smollm2-135m", choices=sorted(LLAMA_SHAPES))
    parser.add_argument("--layers", type=int, default=None, help="decoder layers of the random shape (default: all)")
    parser.add_argument("--model", default=None, help="a real llm.model instead of a random shape")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=2, help="prompts per prefix pass")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--attention", default="auto", choices=["auto", "sdpa", "eager"])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    device = torch.device(args.device)
    data = PreparedData.load(args.data)
    cfg = load_config("tiny", [f"llm.dtype={args.dtype}", "llm.load_in_8bit=false", "llm.max_length=1024"])
    if args.model:
        cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, model=args.model))
        model, tokenizer = load_base(cfg.llm, device=device)
    else:
        _, tokenizer = load_base(cfg.llm, device="cpu")  # the tiny config: builds the offline tokenizer
        model = random_llama(
            args.shape,
            layers=args.layers,
            dtype=getattr(torch, args.dtype),
            device=device,
            pad_token_id=tokenizer.pad_token_id,
        )
    if args.attention == "auto":
        use_cpu_eager_attention(model, device)
    else:
        model.set_attn_implementation(args.attention)
    inputs = NextItemInputs(
        PromptBuilder.from_prepared(data, tokenizer),
        PromptCollator(tokenizer, cfg.llm.max_length),
        data.sequences,
        cfg.data.next_item.history,
    )
    rows, candidates = data.next_item("test")
    pick = np.random.default_rng(0).choice(len(rows), size=min(args.prompts, len(rows)), replace=False)
    rows, candidates = rows.iloc[pick].reset_index(drop=True), candidates[pick]
    prompts = inputs.prompt_ids(rows["user_id"].to_numpy(), rows["pos"].to_numpy(), candidates)
    cands = inputs.candidate_ids(candidates)
    batches = [slice(i, i + args.batch_size) for i in range(0, len(prompts), args.batch_size)]
    prompt_tokens = float(np.mean([len(p) for p in prompts]))
    title_tokens = float(np.mean([len(t) for row in cands for t in row]))
    log.info(
        "%d sequences x %d candidates: prompt %.0f tokens, title %.1f tokens on average",
        len(prompts),
        candidates.shape[1],
        prompt_tokens,
        title_tokens,
    )

    def run(fn):
        return torch.cat([fn(model, inputs.collator, prompts[s], cands[s]) for s in batches]).float().cpu()

    methods = {"shared": candidate_logliks, "separate": full_prompt_logliks}
    candidate_logliks(model, inputs.collator, prompts[:1], cands[:1])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in methods}
    scores = {}
    for r in range(args.rounds):
        for name in list(methods) if r % 2 == 0 else list(methods)[::-1]:
            start = synced(device)
            scores[name] = run(methods[name])
            times[name].append(synced(device) - start)
            log.info("round %d: %s %.2f s", r, name, times[name][-1])
    rate = {name: len(prompts) / statistics.median(t) for name, t in times.items()}
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": args.model or f"random {args.shape}" + (f" ({args.layers} layers)" if args.layers else ""),
        "dtype": args.dtype,
        "attention": model.config._attn_implementation,
        "sequences": len(prompts),
        "candidates": int(candidates.shape[1]),
        "batch_size": args.batch_size,
        "mean_prompt_tokens": round(prompt_tokens, 1),
        "mean_title_tokens": round(title_tokens, 2),
        "rounds": args.rounds,
        "shared_prefix_sequences_per_s": round(rate["shared"], 3),
        "separate_sequences_per_s": round(rate["separate"], 3),
        "speedup": round(rate["shared"] / rate["separate"], 2),
        "max_abs_diff": float((scores["shared"] - scores["separate"]).abs().max()),
    }
    if device.type == "cuda":
        result["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
