"""The GPU paths of tuning and scoring, without Ray: bf16, DeepSpeed ZeRO-2 on CUDA (NCCL), an
8-bit bitsandbytes base, and scoring throughput of a SmolLM2-135M-shaped and a Llama-7B-shaped
model through the same InputBuilder / RecLoRAModel code the stages use.

    python bench/gpu_paths.py --data OUT/data [--device cuda] [--layers-7b 32]

Models are random weights of the real shapes (no download); prompts are real ML-100K prompts
tokenized with the offline tiny tokenizer (ids < 1000, so any vocabulary fits). The CRM is a
randomly initialised SIM of the configured shape. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from shapes import LLAMA_SHAPES, random_llama

from reclora_ray.base_model import dtype_name, load_base
from reclora_ray.config import load_config
from reclora_ray.crm.features import build_features
from reclora_ray.crm.models import build_model as build_crm
from reclora_ray.data.prepared import PreparedData
from reclora_ray.llm.collate import p_yes
from reclora_ray.llm.histories import load_samples
from reclora_ray.llm.inputs import InputBuilder, to_device
from reclora_ray.llm.model import RecLoRAModel, causal_lm, training_loss
from reclora_ray.llm.plora import PersonalizedLoRAModel
from reclora_ray.llm.tune import deepspeed_config, engine_precision, lr_schedule
from reclora_ray.variants import get_variant


def save_random_model(shape: dict, directory: Path, tokenizer_dir: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        **shape,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def synced(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def model_for(cfg, base, data, spec_tables, variant):
    spec, tables = spec_tables
    crm = build_crm(spec, cfg.crm, tables)
    lora = variant.lora_config(cfg.lora)
    llm = PersonalizedLoRAModel(base, lora, crm_dim=crm.representation_dim(lora.gate_input))
    return RecLoRAModel(llm, crm.to(next(base.parameters()).device))


def deepspeed_steps(cfg, model, inputs, rows, device, steps: int) -> dict:
    import deepspeed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29511", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    precision = engine_precision(cfg, dtype_name(causal_lm(model.llm).dtype))
    engine, *_ = deepspeed.initialize(
        model=model.llm,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(cfg, 1, steps, precision),
        dist_init_required=False,
        lr_scheduler=lr_schedule(cfg, steps),
    )
    losses, start = [], None
    for step in range(steps):
        if step == 2:
            start = synced(device)
        batch = to_device(inputs.training_batch(rows.iloc[(step * 8) % 256 :][:8]), device)
        crm_repr = model.crm_repr(batch.pop("crm_features"))
        loss = training_loss(engine, batch, crm_repr, cfg.tune.loss, inputs.collator.yes_no)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return {
        "zero_stage": cfg.tune.zero_stage,
        "engine_precision": precision,
        "steps": steps,
        "step_s": round((synced(device) - start) / (steps - 2), 4),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "finite": all(torch.isfinite(torch.tensor(losses)).tolist()),
    }


@torch.inference_mode()
def scoring_throughput(model, inputs, rows, device, batch_size: int) -> dict:
    model.eval()
    hist = inputs.histories(rows)
    args = rows["user_id"].to_numpy(), rows["item_id"].to_numpy(), rows["timestamp"].to_numpy()
    list(inputs.scoring_batches(*[a[:batch_size] for a in args], hist.take(slice(0, batch_size)), batch_size))
    start = synced(device)
    for _, batch in inputs.scoring_batches(*args, hist, batch_size):
        batch = to_device(batch, device)
        p_yes(model.answer_scores(**batch, answer_ids=inputs.collator.yes_no))
    wall = synced(device) - start
    return {
        "prompts": len(rows),
        "batch_size": batch_size,
        "wall_s": round(wall, 2),
        "prompts_per_s": round(len(rows) / wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a prepared OUT/data with retrieval")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--layers-7b", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    device = torch.device(args.device)
    data = PreparedData.load(args.data)
    variant = get_variant("reclora")
    retrieved = json.loads((data.run.retrieval / "retrieval.json").read_text())
    cfg = load_config(
        "tiny",
        [
            "llm.dtype=bfloat16",
            "llm.load_in_8bit=false",
            "lora.n_meta=8",
            "lora.r=8",
            f"retrieve.k_short={retrieved['k_short']}",
            f"retrieve.k_long={retrieved['k_long']}",
            "llm.max_length=512",
        ],
    )
    tiny_model, _ = load_base(cfg.llm, device="cpu")  # builds the offline tokenizer directory
    tokenizer_dir = Path(tiny_model.name_or_path)
    features = build_features(data, cfg.crm, cfg.retrieve.k_long)
    train = load_samples(data.root, "train", variant).iloc[:256].reset_index(drop=True)
    test = load_samples(data.root, "test", variant).reset_index(drop=True)
    test = test.sample(n=min(args.prompts, len(test)), random_state=0, replace=len(test) < args.prompts)
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}

    with tempfile.TemporaryDirectory() as tmp:
        small = save_random_model(LLAMA_SHAPES["smollm2-135m"], Path(tmp) / "smollm2", tokenizer_dir)
        cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, model=str(small)))
        base, tokenizer = load_base(cfg.llm, device=device)
        inputs = InputBuilder(cfg, data, variant, tokenizer, features[0])
        model = model_for(cfg, base, data, features, variant)
        results["score_135m_bf16"] = scoring_throughput(model, inputs, test, device, batch_size=64)
        results["deepspeed_135m"] = deepspeed_steps(cfg, model, inputs, train, device, args.steps)
        print(json.dumps(results), flush=True)
        del model, base

        eight = load_config("tiny", ["llm.dtype=bfloat16", "llm.load_in_8bit=true", f"llm.model={small}"])
        base8, _ = load_base(eight.llm, device=device)
        model8 = model_for(cfg, base8, data, features, variant)
        model8.train()
        batch = to_device(inputs.training_batch(train.iloc[:8]), device)
        loss = model8(**batch).loss
        loss.backward()
        grads = [p.grad for p in model8.parameters() if p.requires_grad]
        model8.zero_grad()
        results["int8_135m"] = {
            "loss": loss.item(),
            "grads_finite": all(bool(torch.isfinite(g).all()) for g in grads if g is not None),
            "trainable_with_grad": sum(g is not None for g in grads),
            "score": scoring_throughput(model8, inputs, test.iloc[:512], device, batch_size=64),
            "deepspeed": deepspeed_steps(eight, model8, inputs, train, device, args.steps),
        }
        print(json.dumps(results), flush=True)
        del model8, base8
        torch.cuda.empty_cache()

        big = random_llama(
            "llama-7b", layers=args.layers_7b, dtype=torch.bfloat16, device=device, pad_token_id=tokenizer.pad_token_id
        )
        model7 = model_for(cfg, big, data, features, variant)
        results["score_7b_bf16"] = scoring_throughput(model7, inputs, test, device, batch_size=32)
        results["score_7b_bf16"]["layers"] = args.layers_7b
        if device.type == "cuda":
            results["peak_gpu_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
