"""Step-time overhead of personalized LoRA over plain LoRA r=8 (forward + backward), random weights.

For each model shape, one frozen base is built once and every variant's wrapped layers are
swapped onto it in turn: plain LoRA r=8 (the reference), plora at N_m in {1, 2, 4, 8, 16}, and a
naive plora N_m=16 that materializes each sample's d_out x d_in weight (W + s sum_k alpha_k B_k A_k)
for contrast. After warmup, every round runs each variant once (order rotated per round); a
variant's time is its median over rounds, and its ratio is that over plain LoRA's median.

Shapes:
  135m  SmolLM2-135M (hidden 576, 30 layers, 9/3 heads, vocab 49152): the whole model, loss on
        every position (causal LM over the prompt, as in tuning).
  7b    Llama-7B (hidden 4096, MLP 11008, 32 heads, vocab 32000), scaled to --layers-7b decoder
        layers. All 32 layers of a 7B are identical, so a slice has the full model's per-layer
        ratio; the loss is on the last position only (logits_to_keep=1) so the vocab head, about 2%
        of a real 7B step but a large share of a 2-layer slice, does not dilute the ratio.

Peak memory: on CPU the process's peak RSS (measured before the naive variant runs, and after);
on CUDA the peak allocated bytes per variant.

    python bench/plora_overhead.py                      # both shapes, CPU defaults (a few minutes)
    python bench/plora_overhead.py --device cuda --dtype bfloat16 --batch 8 --seq 512 --batch-7b 4 --seq-7b 0 --layers-7b 32

The last line is one JSON object: {"135m": {"ratio_vs_lora": {"1": ..}, "naive_ratio_16": .., ...}, "7b": ...}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shapes import LLAMA_SHAPES  # noqa: E402  (bench/ is on sys.path when run as a script)
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from reclora_ray.config import LoRAConfig  # noqa: E402
from reclora_ray.llm.plora import PersonalizedLoRAModel, PLoRALinear  # noqa: E402

log = logging.getLogger("plora_overhead")

N_METAS = (1, 2, 4, 8, 16)
CRM_DIM = 64

SHAPES = {"135m": LLAMA_SHAPES["smollm2-135m"], "7b": LLAMA_SHAPES["llama-7b"]}


class NaivePLoRALinear(PLoRALinear):
    """The straightforward form: each sample's full weight W + s * sum_k alpha_k B_k A_k, then bmm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self._routed_alpha(x).to(self.lora_A.dtype)
        a = self.lora_A.unflatten(0, (self.n_meta, self.r))  # (N_m, r, d_in)
        b = self.lora_B.unflatten(1, (self.n_meta, self.r))  # (d_out, N_m, r)
        delta = torch.einsum("bk,okr,krd->bod", alpha, b, a) * self.scaling  # (batch, d_out, d_in)
        weight = self.base_layer.weight + delta.to(self.base_layer.weight.dtype)
        out = torch.bmm(x, weight.transpose(1, 2))
        if self.base_layer.bias is not None:
            out = out + self.base_layer.bias
        return out


class VariantBench:
    """One frozen base; each variant's wrapped layers are installed on it only while it runs."""

    def __init__(self, base: torch.nn.Module, device: torch.device):
        self.base = base
        self.device = device
        self.originals = {}
        self.variants = {}  # name -> (wrapper model, {module path: layer})

    def add(self, name: str, cfg: LoRAConfig, adapter_dtype: torch.dtype, naive: bool = False) -> None:
        self._restore_originals()
        model = PersonalizedLoRAModel(self.base, cfg, CRM_DIM, dtype=adapter_dtype).to(self.device)
        layers = model.lora_layers()
        for path, layer in layers.items():
            self.originals[path] = layer.base_layer
            if naive:
                layer.__class__ = NaivePLoRALinear
            with torch.no_grad():  # non-zero B: a trained adapter, so no path is skipped as zero
                layer.lora_B.normal_(std=0.01)
        self.variants[name] = (model, layers)
        self._restore_originals()

    def install(self, name: str) -> PersonalizedLoRAModel:
        model, layers = self.variants[name]
        for path, layer in layers.items():
            parent, _, child = path.rpartition(".")
            setattr(self.base.get_submodule(parent), child, layer)
        return model

    def _restore_originals(self) -> None:
        for path, module in self.originals.items():
            parent, _, child = path.rpartition(".")
            setattr(self.base.get_submodule(parent), child, module)


def make_step(shape: str, batch: int, seq: int, vocab: int, device: torch.device):
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
    attention_mask = torch.ones_like(input_ids)
    crm_repr = torch.randn(batch, CRM_DIM, generator=gen).to(device)
    answer = torch.randint(0, vocab, (batch,), generator=gen).to(device)

    def step(model: PersonalizedLoRAModel) -> None:
        model.zero_grad(set_to_none=True)
        if shape == "7b":
            logits = model(input_ids, attention_mask, crm_repr, logits_to_keep=1).logits[:, -1]
            loss = F.cross_entropy(logits.float(), answer)
        else:
            loss = model(input_ids, attention_mask, crm_repr, labels=input_ids).loss
        loss.backward()

    return step


def timed(step, model, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    step(model)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def bench_shape(shape: str, args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    adapter_dtype = getattr(torch, args.adapter_dtype or args.dtype)
    overrides = dict(SHAPES[shape])
    layers_note = "all 30 layers"
    if shape == "7b":
        overrides["num_hidden_layers"] = args.layers_7b
        layers_note = f"{args.layers_7b} of 32 layers, loss on the last position"
    batch, seq = args.batch, args.seq
    if shape == "7b":
        batch, seq = (args.batch_7b or batch), (args.seq_7b or seq)
    log.info("%s: building a random %s base (%s), batch %d x seq %d", shape, args.dtype, layers_note, batch, seq)
    torch.manual_seed(0)
    with torch.device(device):  # initialize in place: a 7B built on the host first takes minutes
        base = LlamaForCausalLM(LlamaConfig(**overrides)).to(dtype)
    bench = VariantBench(base, device)
    lora_cfg = LoRAConfig(r=8, alpha=16, dropout=0.0, gate_dropout=0.0)
    bench.add("lora", dataclasses.replace(lora_cfg, variant="lora"), adapter_dtype)
    for n_meta in N_METAS:
        bench.add(f"plora_{n_meta}", dataclasses.replace(lora_cfg, n_meta=n_meta), adapter_dtype)
    bench.add("naive_16", dataclasses.replace(lora_cfg, n_meta=16), adapter_dtype, naive=True)
    step = make_step(shape, batch, seq, overrides["vocab_size"], device)

    results = {}
    for phase in (["lora"] + [f"plora_{n}" for n in N_METAS], ["lora", "naive_16"]):
        times = {name: [] for name in phase}
        peak_bytes = {}
        for name in list(phase):
            model = bench.install(name)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                for _ in range(args.warmup):
                    timed(step, model, device)
            except torch.OutOfMemoryError:
                log.warning("%s: %s runs out of device memory at this size", shape, name)
                model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                results[name] = None
                phase.remove(name)
                continue
            if device.type == "cuda":
                peak_bytes[name] = torch.cuda.max_memory_allocated()
        for round_ in range(args.repeats):
            order = phase[round_ % len(phase) :] + phase[: round_ % len(phase)]
            for name in order:
                times[name].append(timed(step, bench.install(name), device))
            log.info(
                "%s round %d/%d: %s",
                shape,
                round_ + 1,
                args.repeats,
                ", ".join(f"{n} {times[n][-1]:.3f}s" for n in phase),
            )
        for name in phase:
            if name not in results:
                results[name] = {
                    "median_s": statistics.median(times[name]),
                    "best_s": min(times[name]),
                    "peak_gb": peak_bytes.get(name, 0) / 2**30,
                }
        if device.type == "cpu":
            results[phase[-1]]["peak_rss_gb_after"] = peak_rss_gb()

    lora_s = results["lora"]["median_s"]
    summary = {
        "ratio_vs_lora": {str(n): round(results[f"plora_{n}"]["median_s"] / lora_s, 3) for n in N_METAS},
        "naive_ratio_16": round(results["naive_16"]["median_s"] / lora_s, 3)
        if results["naive_16"]
        else "out of memory",
        # best-of-rounds: on a shared machine, interference only ever adds time
        "ratio_vs_lora_best": {
            str(n): round(results[f"plora_{n}"]["best_s"] / results["lora"]["best_s"], 3) for n in N_METAS
        },
        "lora_step_s": round(lora_s, 4),
        "setup": f"batch {batch} x seq {seq}, {layers_note}, {args.dtype} base, {args.adapter_dtype or args.dtype} adapters on {args.device}, "
        f"median of {args.repeats} interleaved rounds after {args.warmup} warmup",
    }
    if device.type == "cpu":
        summary["peak_rss_gb"] = round(results[f"plora_{N_METAS[-1]}"]["peak_rss_gb_after"], 2)
        summary["naive_peak_rss_gb"] = round(results["naive_16"]["peak_rss_gb_after"], 2)
    else:
        summary["peak_gpu_gb"] = {n: round(r["peak_gb"], 2) if r else "out of memory" for n, r in results.items()}
        summary["peak_rss_gb"] = round(peak_rss_gb(), 2)
    log.info("%s: %s", shape, summary)
    del bench, base
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["135m", "7b"], choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch-7b", type=int, default=None, help="default: --batch")
    parser.add_argument("--seq-7b", type=int, default=128, help="0: --seq")
    parser.add_argument("--layers-7b", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument(
        "--adapter-dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="default: --dtype (as under DeepSpeed bf16/fp16, which casts the whole module)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    report = {shape: bench_shape(shape, args) for shape in args.shapes}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
