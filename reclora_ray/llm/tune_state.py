"""The tuning stage's resumable state, without pickle: safetensors for tensors, JSON for the rest.

A tune run keeps its Ray Train checkpoints in OUT/adapter/.ray-train-<variant>/ (and
OUT/next-item/adapter/.ray-train-<variant>/), a folder that survives a kill and is read by the
next run. DeepSpeed's own checkpoints are pickles loaded with `torch.load(weights_only=False)`:
whoever can write the run directory would run code in the next `reclora tune`. So a checkpoint
holds only these files, and resuming reads nothing else:

    train_state.json              rank 0: format, history, the engine's step counters, the lr scheduler
    trainable.safetensors         rank 0: every trainable parameter of the engine's module, by name
    engine-rank<r>.safetensors    each rank: the tensors of its optimizer state (ZeRO partitions
                                  included) and its torch (and CUDA) RNG state
    engine-rank<r>.json           each rank: the rest of that state, with the tensors by key

Anything that is not plain data (a tensor, number, string, bool, None, list, tuple, dict) is
refused when saving; DeepSpeed's loss scaler is kept as its attributes and set back on the new
engine's own scaler. A checkpoint that lacks a file, holds a corrupt one, or holds a pickle
(`*.pt`, `*.pth`, `*.bin`, `*.pkl`: an older DeepSpeed-format checkpoint, or a planted one) is
refused with an error naming the file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

STATE_FILE = "train_state.json"
TRAINABLE = "trainable.safetensors"
FORMAT = "reclora-tune-state"
VERSION = 1
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
# Only DeepSpeed's universal-checkpoint conversion reads these; they hold DeepSpeed classes.
_UNSAVED_OPTIMIZER_KEYS = ("param_slice_mappings", "universal_checkpoint_info")


class TuneCheckpointError(ValueError):
    """A tune checkpoint that cannot be resumed from; the message names the file."""


def rank_files(rank: int) -> tuple[str, str]:
    return f"engine-rank{rank}.safetensors", f"engine-rank{rank}.json"


# --------------------------------------------------------------------------- plain-data codec


def encode(obj, tensors: dict, where: str = "state"):
    """`obj` as JSON, its tensors moved into `tensors` (referenced by key); TypeError for anything
    else (no object is ever saved that would need pickle to come back)."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScalerBase

    if isinstance(obj, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().clone().contiguous()
        return {"$tensor": key}
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):  # IntEnum (ZeroStageEnum) included: saved as its value
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"$float": repr(obj)}
    if isinstance(obj, torch.dtype):
        return {"$dtype": str(obj).removeprefix("torch.")}
    if isinstance(obj, LossScalerBase):
        return {"$loss_scaler": type(obj).__name__, "attrs": encode(dict(sorted(vars(obj).items())), tensors, where)}
    if isinstance(obj, tuple):
        return {"$tuple": [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"{where}: key {k!r} is neither a string nor an integer")
            items.append([int(k) if isinstance(k, int) else k, encode(v, tensors, f"{where}.{k}")])
        return {"$dict": items}
    raise TypeError(f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} cannot be saved as plain data")


def decode(obj, tensors: dict, path: Path, loss_scaler=None):
    """The inverse of `encode`; TuneCheckpointError (naming `path`) for anything it did not write.
    A saved loss scaler's attributes are set on `loss_scaler`, the new engine's own."""
    import torch

    if obj is None or isinstance(obj, (bool, str, int, float)):
        return obj
    if isinstance(obj, list):
        return [decode(v, tensors, path, loss_scaler) for v in obj]
    if not isinstance(obj, dict) or len(obj) not in (1, 2):
        raise TuneCheckpointError(f"{path}: refused, {str(obj)[:80]!r} is not plain saved data")
    if "$tensor" in obj:
        if obj["$tensor"] not in tensors:
            raise TuneCheckpointError(f"{path}: refers to tensor {obj['$tensor']!r}, missing from its safetensors file")
        return tensors[obj["$tensor"]]
    if "$float" in obj and obj["$float"] in ("nan", "inf", "-inf"):
        return float(obj["$float"])
    if "$dtype" in obj and isinstance(getattr(torch, str(obj["$dtype"]), None), torch.dtype):
        return getattr(torch, obj["$dtype"])
    if "$tuple" in obj:
        return tuple(decode(v, tensors, path, loss_scaler) for v in obj["$tuple"])
    if "$dict" in obj:
        out = {}
        for item in obj["$dict"]:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], (str, int))):
                raise TuneCheckpointError(f"{path}: refused, malformed entry {str(item)[:80]!r}")
            out[item[0]] = decode(item[1], tensors, path, loss_scaler)
        return out
    if "$loss_scaler" in obj and set(obj) == {"$loss_scaler", "attrs"}:
        if loss_scaler is None or type(loss_scaler).__name__ != obj["$loss_scaler"]:
            raise TuneCheckpointError(
                f"{path}: saved with a {obj['$loss_scaler']} loss scaler, but this engine has "
                f"{type(loss_scaler).__name__}: the precision settings changed"
            )
        for key, value in decode(obj["attrs"], tensors, path).items():
            if not hasattr(loss_scaler, key):
                raise TuneCheckpointError(f"{path}: the loss scaler has no attribute {key!r}")
            setattr(loss_scaler, key, value)
        return loss_scaler
    raise TuneCheckpointError(f"{path}: refused, {str(obj)[:80]!r} is not plain saved data")


# --------------------------------------------------------------------------- save / load


def _optimizer_state(engine) -> dict:
    state = engine.optimizer.state_dict()
    if isinstance(state, dict):
        state = {k: v for k, v in state.items() if k not in _UNSAVED_OPTIMIZER_KEYS}
    return state


def _trainable(engine) -> dict:
    return {name: p for name, p in engine.module.named_parameters() if p.requires_grad}


def save_state(engine, directory: Path, rank: int, world: int, extra: dict) -> None:
    """This rank's part of a checkpoint in `directory` (every rank calls it; rank 0 also writes the
    shared files). `extra`: JSON the loop wants back (its history)."""
    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    tensors: dict = {}
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "rank": rank,
        "world": world,
        "optimizer": encode(_optimizer_state(engine), tensors, "optimizer"),
        "torch_rng": encode(torch.get_rng_state(), tensors, "torch_rng"),
        "cuda_rng": encode(torch.cuda.get_rng_state(), tensors, "cuda_rng") if torch.cuda.is_available() else None,
    }
    weights, meta = rank_files(rank)
    save_file(tensors, str(directory / weights))
    (directory / meta).write_text(json.dumps(payload))
    if rank != 0:
        return
    zero_stage = engine.zero_optimization_stage()
    if zero_stage < 3:  # ZeRO-3 partitions the parameters: its optimizer state restores them
        save_file(
            {n: p.detach().cpu().clone().contiguous() for n, p in _trainable(engine).items()},
            str(directory / TRAINABLE),
        )
    scheduler = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
    state = {
        "format": FORMAT,
        "version": VERSION,
        "world": world,
        "zero_stage": zero_stage,
        "global_steps": engine.global_steps,
        "global_samples": engine.global_samples,
        "skipped_steps": engine.skipped_steps,
        "lr_scheduler": encode(scheduler, {}, "lr_scheduler"),
        **extra,
    }
    (directory / STATE_FILE).write_text(json.dumps(state))


def save_engine_adapter(engine, directory: Path, rank: int) -> None:
    """The engine's adapter (gate and meta-LoRAs, `save_adapter`'s format) written by rank 0. Every
    rank calls it: under ZeRO-3 each holds a slice of every parameter, gathered here for the write
    (a collective), or rank 0 would write empty tensors."""
    from contextlib import nullcontext

    import deepspeed

    from reclora_ray.llm.plora import save_adapter, unwrap

    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    whole = (
        deepspeed.zero.GatheredParameters(trainable, modifier_rank=None)
        if engine.zero_optimization_stage() == 3
        else nullcontext()
    )
    with whole:
        if rank == 0:
            save_adapter(unwrap(engine.module), directory)


def refuse_pickles(directory: Path) -> None:
    for path in sorted(Path(directory).rglob("*")):
        if path.is_file() and path.suffix.lower() in PICKLE_SUFFIXES:
            raise TuneCheckpointError(
                f"{path}: refused, a tune checkpoint holds no pickle (an older DeepSpeed-format "
                "checkpoint, or not ours); delete the checkpoint folder to start the run over"
            )


def read_state(directory: Path) -> dict:
    """train_state.json of a checkpoint (the history, the counters), checked; the folder is checked
    for pickles first."""
    directory = Path(directory)
    refuse_pickles(directory)
    path = directory / STATE_FILE
    state = _read_json(path)
    if state.get("format") != FORMAT or state.get("version") != VERSION:
        raise TuneCheckpointError(
            f"{path}: refused, not a {FORMAT} v{VERSION} file "
            f"(format {state.get('format')!r}, version {state.get('version')!r})"
        )
    return state


def load_state(engine, directory: Path, rank: int, world: int) -> dict:
    """Restore `engine` (trainable parameters, optimizer and ZeRO partitions, lr scheduler, step
    counters) and this rank's torch RNG from a checkpoint saved by `save_state`; returns its
    train_state.json. Every file is checked before the engine is touched."""
    import torch

    directory = Path(directory)
    state = read_state(directory)
    if state["world"] != world or state["zero_stage"] != engine.zero_optimization_stage():
        raise TuneCheckpointError(
            f"{directory / STATE_FILE}: saved by {state['world']} worker(s) with ZeRO stage "
            f"{state['zero_stage']}, resumed by {world} with stage "
            f"{engine.zero_optimization_stage()}: the run's settings changed"
        )
    loss_scaler = getattr(engine.optimizer, "loss_scaler", None)
    optimizer_states, rng, cuda_rng = [], None, None
    for r in range(world):
        weights, meta = rank_files(r)
        payload = _read_json(directory / meta)
        if payload.get("format") != FORMAT or payload.get("rank") != r:
            raise TuneCheckpointError(f"{directory / meta}: refused, not rank {r}'s {FORMAT} file")
        tensors = _read_tensors(directory / weights)
        optimizer_states.append(decode(payload["optimizer"], tensors, directory / meta, loss_scaler))
        if r == rank:
            rng = decode(payload["torch_rng"], tensors, directory / meta)
            cuda_rng = decode(payload.get("cuda_rng"), tensors, directory / meta)
    trainable = None
    if state["zero_stage"] < 3:
        trainable = _read_tensors(directory / TRAINABLE)
        params = _trainable(engine)
        if set(trainable) != set(params):
            raise TuneCheckpointError(
                f"{directory / TRAINABLE}: holds {sorted(set(trainable) ^ set(params))[:4]} "
                "that this model's trainable parameters do not (or the reverse)"
            )
    scheduler = decode(state["lr_scheduler"], {}, directory / STATE_FILE)

    with torch.no_grad():
        for name, param in _trainable(engine).items() if trainable is not None else ():
            param.copy_(trainable[name].to(param.device, param.dtype))
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if isinstance(engine.optimizer, (DeepSpeedZeroOptimizer, DeepSpeedZeroOptimizer_Stage3)):
        engine.optimizer.load_state_dict(optimizer_states, load_optimizer_states=True, load_from_fp32_weights=True)
    else:
        engine.optimizer.load_state_dict(optimizer_states[rank])
    if scheduler is not None:
        engine.lr_scheduler.load_state_dict(scheduler)
    engine.global_steps, engine.global_samples = state["global_steps"], state["global_samples"]
    engine.skipped_steps = state["skipped_steps"]
    torch.set_rng_state(rng)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
    return state


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise TuneCheckpointError(f"{path} is missing: not a complete tune checkpoint")
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TuneCheckpointError(f"{path}: refused, not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise TuneCheckpointError(f"{path}: refused, not a JSON object")
    return value


def _read_tensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise TuneCheckpointError(f"{path} is missing: not a complete tune checkpoint")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise TuneCheckpointError(f"{path}: refused, not a safetensors file ({exc})") from None
