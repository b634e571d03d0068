"""Throughput of `reclora score`'s scoring path against a bare forward and a `generate` scorer.

Three ways to get P(yes) for the same test prompts, timed in one run (median over --rounds,
the order rotated per round):

  full      the Scorer a `reclora score` actor runs: samples in, predictions out (histories,
            prompt text, tokenization, length buckets, CRM features and R_c, gate, one forward
            with logits at the last position only, softmax over Yes/No)
  forward   a bare `model(**batch)` over the very token batches `full` builds, already on the
            device: all positions' logits, nothing else. ratio_vs_forward = full / forward
            samples/s (target >= 0.9); ratio_vs_last_position_forward compares with a bare
            forward that also keeps the last position only, the pure LLM cost.
  generate  what most LLM-rec code does: `generate(max_new_tokens=N)` with output scores, and
            P(yes) from the first generated position. Forced to N new tokens (min_new_tokens)
            so it is deterministic; a tuned model stops after "Yes." + EOS, about 3 tokens.

The model is random weights of a real shape (--shape, no download; prompts tokenized with the
offline tiny tokenizer) or any `llm.model` (--model smollm2-packaged, an HF id or a path). The
CRM is a randomly initialised one of the configured kind. max_abs_diff_vs_generate checks that
the generate scorer and ours give the same P(yes).

    python bench/score_throughput.py --data runs/quickstart/data                 # CPU, 135M shape
    python bench/score_throughput.py --data OUT/data --device cuda --dtype bfloat16 --shape llama-7b --batch-size 32 --prompts 1000

Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shapes import LLAMA_SHAPES, random_llama  # noqa: E402

from reclora_ray.base_model import load_base  # noqa: E402
from reclora_ray.config import load_config  # noqa: E402
from reclora_ray.crm.features import build_features  # noqa: E402
from reclora_ray.crm.models import build_model as build_crm  # noqa: E402
from reclora_ray.data.prepared import PreparedData  # noqa: E402
from reclora_ray.llm.collate import p_yes  # noqa: E402
from reclora_ray.llm.histories import load_samples  # noqa: E402
from reclora_ray.llm.inputs import InputBuilder, to_device  # noqa: E402
from reclora_ray.llm.model import RecLoRAModel  # noqa: E402
from reclora_ray.llm.plora import PersonalizedLoRAModel  # noqa: E402
from reclora_ray.llm.score import Scorer  # noqa: E402
from reclora_ray.variants import get_variant  # noqa: E402

log = logging.getLogger("score_throughput")


def synced(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def build(args, cfg, data, variant, device):
    """(RecLoRAModel, tokenizer, CRM spec or None) for the variant, on a random or a named base."""
    dtype = getattr(torch, args.dtype)
    if args.model:
        cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, model=args.model))
        base, tokenizer = load_base(cfg.llm, device=device)
    else:
        _, tokenizer = load_base(cfg.llm, device="cpu")  # the tiny config: builds the offline tokenizer
        base = random_llama(
            args.shape, layers=args.layers, dtype=dtype, device=device, pad_token_id=tokenizer.pad_token_id
        )
    base.requires_grad_(False)
    crm, spec = None, None
    if variant.uses_crm:
        spec, tables = build_features(data, cfg.crm, cfg.retrieve.k_long)
        crm = build_crm(spec, cfg.crm, tables).to(device)
    llm = base
    if variant.adapter:
        lora = variant.lora_config(cfg.lora)
        crm_dim = crm.representation_dim(lora.gate_input) if crm else 0
        llm = PersonalizedLoRAModel(base, lora, crm_dim=crm_dim, dtype=dtype)
        llm.requires_grad_(False)
    return RecLoRAModel(llm, crm).eval(), tokenizer, spec


@torch.inference_mode()
def generate_p_yes(model: RecLoRAModel, batch: dict, yes_id: int, no_id: int, new_tokens: int, pad_id: int):
    """P(yes) from the first generated position of `generate`, as generate-based scorers read it."""
    llm = model.llm
    plora = llm if isinstance(llm, PersonalizedLoRAModel) else None
    routing = plora.routing(model.crm_repr(batch.get("crm_features"))) if plora else contextlib.nullcontext()
    with routing:
        out = (plora.base_model if plora else llm).generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=pad_id,
        )
    return p_yes(out.scores[0][:, [yes_id, no_id]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a prepared OUT/data with retrieval (reclora prepare + retrieve)")
    parser.add_argument("--shape", default="smollm2-135m", choices=sorted(LLAMA_SHAPES))
    parser.add_argument("--layers", type=int, default=None, help="decoder layers of the random shape (default: all)")
    parser.add_argument("--model", default=None, help="a real llm.model instead of a random shape")
    parser.add_argument("--variant", default="reclora")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--generate-tokens", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    device = torch.device(args.device)
    data = PreparedData.load(args.data)
    variant = get_variant(args.variant)
    retrieved = json.loads((data.run.retrieval / "retrieval.json").read_text())
    cfg = load_config(
        "tiny",
        [
            f"llm.dtype={args.dtype}",
            "llm.load_in_8bit=false",
            "lora.n_meta=8",
            f"retrieve.k_short={retrieved['k_short']}",
            f"retrieve.k_long={retrieved['k_long']}",
            "llm.max_length=512",
        ],
    )
    model, tokenizer, spec = build(args, cfg, data, variant, device)
    inputs = InputBuilder(cfg, data, variant, tokenizer, spec)
    scorer = Scorer.from_model(model, inputs, data, device, args.batch_size)
    yes_id, no_id = inputs.collator.yes_id, inputs.collator.no_id

    test = load_samples(data.root, "test", variant)
    rows = test.sample(n=min(args.prompts, len(test)), random_state=0).reset_index(drop=True)
    hist = inputs.histories(rows)
    columns = rows["user_id"].to_numpy(), rows["item_id"].to_numpy(), rows["timestamp"].to_numpy()
    batches = [to_device(batch, device) for _, batch in inputs.scoring_batches(*columns, hist, args.batch_size)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    log.info(
        "%d prompts, %.0f tokens on average, %d batches of up to %d",
        len(rows),
        tokens / len(rows),
        len(batches),
        args.batch_size,
    )

    def full():
        return scorer(rows)["p_yes"].to_numpy()

    @torch.inference_mode()
    def forward():
        for batch in batches:
            model(**batch)

    @torch.inference_mode()
    def forward_last():
        for batch in batches:
            model(**batch, logits_to_keep=1)

    def generate():
        return [generate_p_yes(model, b, yes_id, no_id, args.generate_tokens, tokenizer.pad_token_id) for b in batches]

    methods = {"full": full, "forward": forward, "forward_last": forward_last, "generate": generate}
    scorer(rows.iloc[: args.batch_size])  # warm-up: allocator, kernels, first-call caches
    generate_p_yes(model, batches[-1], yes_id, no_id, args.generate_tokens, tokenizer.pad_token_id)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(args.rounds):
        order = list(methods)[r % len(methods) :] + list(methods)[: r % len(methods)]
        for name in order:
            start = synced(device)
            methods[name]()
            times[name].append(synced(device) - start)
            log.info("round %d: %s %.2f s", r, name, times[name][-1])

    ours = full()
    by_batch = torch.cat(generate()).float().cpu().numpy()
    order = [i for index, _ in inputs.scoring_batches(*columns, hist, args.batch_size) for i in index]
    theirs = by_batch[torch.tensor(order).argsort().numpy()]
    rate = {name: len(rows) / statistics.median(t) for name, t in times.items()}
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": args.model or f"random {args.shape}" + (f" ({args.layers} layers)" if args.layers else ""),
        "dtype": args.dtype,
        "variant": variant.name,
        "prompts": len(rows),
        "batch_size": args.batch_size,
        "mean_tokens": round(tokens / len(rows), 1),
        "generate_tokens": args.generate_tokens,
        "rounds": args.rounds,
        "samples_per_s": round(rate["full"], 2),
        "forward_samples_per_s": round(rate["forward"], 2),
        "last_position_forward_samples_per_s": round(rate["forward_last"], 2),
        "generate_samples_per_s": round(rate["generate"], 2),
        "ratio_vs_forward": round(rate["full"] / rate["forward"], 3),
        "ratio_vs_last_position_forward": round(rate["full"] / rate["forward_last"], 3),
        "speedup_vs_generate": round(rate["full"] / rate["generate"], 2),
        "max_abs_diff_vs_generate": float(abs(ours - theirs).max()),
    }
    if device.type == "cuda":
        result["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
