"""Typed run configuration: one dataclass section per stage, loaded from YAML.

Sections are frozen once loaded: code that needs another value builds a new section with
dataclasses.replace (a variant's CRM or learning rate, a CLI option), so nothing changes a config
after it was validated.

A config file only states what differs from the defaults below (the paper's settings).
`extends: <name or path>` inherits another config first. Unknown keys, wrong types and bad
values fail loudly with the dotted path of the offending key. `--set a.b=value` overrides any
key after loading; the value is parsed as YAML (`--set crm.lr=1e-3`, `--set lora.target_modules=[q_proj]`).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import string
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

PACKAGED_CONFIGS = ("quickstart", "quickstart-next-item", "tiny", "ml-1m", "ml-1m-1gpu", "ml-25m", "goodreads")
DATASETS = ("ml-100k", "ml-1m", "ml-25m", "goodreads", "interactions")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key."""


EXECUTION = "execution"  # field metadata: how a stage runs, never what it computes


def execution(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING) -> Any:
    """A field that says how a stage runs (parallelism, devices, batch sizes that do not change
    a result, retries, which variants run): left out of every fingerprint, so changing it never
    invalidates or blocks an output (reclora_ray/rundir.py, `fingerprint_payload`)."""
    return field(default=default, default_factory=factory, metadata={EXECUTION: True})


ADDED = "added"  # field metadata: a setting newer than outputs that may exist


def added(default: Any) -> Any:
    """A setting added after run directories were written, whose default is how those runs
    behaved: left out of fingerprints while at its default, so their outputs stay valid; any
    other value changes the fingerprint."""
    return field(default=default, metadata={ADDED: True})


def is_execution(cls: type, name: str) -> bool:
    return any(f.name == name and f.metadata.get(EXECUTION) for f in dataclasses.fields(cls))


@dataclass(frozen=True)
class RunConfig:
    seed: int = 42
    ray_address: Optional[str] = execution(None)  # None: connect to RAY_ADDRESS if set, else start a local Ray
    num_cpus: Optional[int] = execution(None)  # local Ray only; None lets Ray count the cores


@dataclass(frozen=True)
class InteractionFilesConfig:
    """The behaviour log of `data.dataset: interactions`: CSV or Parquet files, column names mapped."""

    paths: list[str] = field(default_factory=list)  # files, globs or URIs; relative to data.raw_dir
    user: str = "user_id"
    item: str = "item_id"
    timestamp: str = "timestamp"  # unix seconds (int or float) or ISO-8601 dates
    rating: Optional[str] = None  # a numeric rating, labelled by data.label_threshold
    label: Optional[str] = None  # an explicit 0/1 label (e.g. clicked); wins over the rating rule


@dataclass(frozen=True)
class ItemFilesConfig:
    paths: list[str] = field(default_factory=list)
    item: str = "item_id"
    title: str = "title"
    text: Optional[str] = None  # an optional longer text (the `details` field of the description)
    fields: list[str] = field(default_factory=list)  # categorical fields, list-valued allowed: CRM features
    list_separator: str = "|"  # splits a CSV field into a list (Parquet lists are taken as they are)


@dataclass(frozen=True)
class UserFilesConfig:
    paths: list[str] = field(default_factory=list)  # empty: no user file (no profiles)
    user: str = "user_id"
    fields: list[str] = field(default_factory=list)  # profile fields (kept as strings)


@dataclass(frozen=True)
class DataFilesConfig:
    interactions: InteractionFilesConfig = field(default_factory=InteractionFilesConfig)
    items: ItemFilesConfig = field(default_factory=ItemFilesConfig)
    users: UserFilesConfig = field(default_factory=UserFilesConfig)


@dataclass(frozen=True)
class TextConfig:
    """Templates with named fields ({title}, {genres}, ...); None: the dataset's own wording
    (Figure 2 for the benchmarks; neutral "items" for `interactions`, without stars when unrated).
    A description or profile part, or a prompt line, that names an empty field is left out;
    list fields are joined with ", "."""

    description: Optional[list[str]] = None  # item text parts: any items-table field
    profile: Optional[list[str]] = None  # user profile parts: any users-table field
    prompt: Optional[list[str]] = None  # lines: {profile} {Subject} {subject} {history} {title}
    history_item: Optional[str] = None  # one history entry: {index} {title} {rating} {stars}


@dataclass(frozen=True)
class NextItemDataConfig:
    """The next-item ranking task (iLoRA / LLaRA protocol), built by prepare beside the CTR samples."""

    history: int = 10  # behaviours before the target shown in the prompt (any split)
    candidates: int = 20  # the target and candidates - 1 items the user never interacted with
    min_history: int = 1  # targets with fewer earlier behaviours are left out
    max_per_split: Optional[int] = 100_000  # a seeded random subsample of a larger split's targets


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["ml-100k", "ml-1m", "ml-25m", "goodreads", "interactions"] = "ml-100k"
    raw_dir: Optional[str] = None  # None: ml-100k from the packaged copy; other datasets need it
    files: DataFilesConfig = field(default_factory=DataFilesConfig)  # dataset `interactions` only
    # Keep the items table's items that no behaviour left (never interacted with, or dropped by
    # k-core) as cold-start items: embedded and scorable from their text (`interactions` only).
    cold_items: bool = False
    text: TextConfig = field(default_factory=TextConfig)
    label_threshold: Optional[float] = None  # None: the paper's rule (>= 4, or > 3.0 on ML-25M); t: rating >= t
    k_core: int = 5  # 0 disables; repeated until stable
    min_history: int = 0  # ReLLa protocol: a user's first N behaviours are history only
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    test_subsample: Optional[int] = None  # test split cut to a fixed random subsample at prepare time (seed run.seed)
    blocks: Optional[int] = execution(
        None
    )  # min. Ray Data read tasks / sequence shards; None: by size (64 MB, 4M rows)
    rating_range: Optional[list[float]] = None  # [min, max] a rating may take; None: the dataset's own
    timestamp_unit: Literal["s", "ms"] = "s"  # ms: the log holds milliseconds (converted); s refuses them
    duplicates: Literal["drop", "refuse"] = (
        "drop"  # exact duplicate rows: dropped and counted in meta.json, or an error
    )
    single_class: Literal["refuse", "warn"] = "refuse"  # a split whose labels are all 0 (or all 1): AUC is undefined
    next_item: NextItemDataConfig = field(default_factory=NextItemDataConfig)


@dataclass(frozen=True)
class EmbedConfig:
    model: Optional[str] = None  # None: the tuning LLM (llm.model)
    pooling: Literal["mean", "last"] = "mean"
    pca_dim: int = 512
    max_length: int = 64
    batch_size: int = execution(32)
    concurrency: int = execution(1)  # actors in the Ray Data pool
    num_gpus: float = execution(0.0)  # per actor
    pca_fit_items: int = 200_000  # PCA is fitted on all items up to this many, else on a sample


@dataclass(frozen=True)
class RetrieveConfig:
    k_long: int = 60
    k_short: int = 10
    long_mode: Literal["semantic", "recent"] = "semantic"
    short_mode: Literal["semantic", "recent"] = "semantic"
    batch_size: int = execution(131072)  # samples per Ray Data batch; each is grouped per user inside
    concurrency: int = execution(2)  # actors in the Ray Data pool (1 CPU each)

    @property
    def uses_embeddings(self) -> bool:
        """Whether either list is retrieved by similarity (and so needs OUT/embeddings)."""
        return "semantic" in (self.long_mode, self.short_mode)


@dataclass(frozen=True)
class SIMConfig:
    attention_layers: int = 1
    heads: int = 2  # multi-head target attention of the exact search unit
    search_k: int = 20  # soft search keeps the k behaviours closest to the target


@dataclass(frozen=True)
class DINConfig:
    attention_hidden: list[int] = field(default_factory=lambda: [64, 32])


@dataclass(frozen=True)
class DeepFMConfig:
    dnn_hidden: list[int] = field(default_factory=lambda: [256, 256, 256])


@dataclass(frozen=True)
class AutoIntConfig:
    attention_layers: int = 3
    attention_size: int = 64
    heads: int = 1


@dataclass(frozen=True)
class DCNv2Config:
    cross_layers: int = 3
    dnn_hidden: list[int] = field(default_factory=lambda: [256, 256, 256])


@dataclass(frozen=True)
class GRU4RecConfig:
    gru_layers: int = 1
    gru_hidden: int = 64


@dataclass(frozen=True)
class CaserConfig:
    vertical_kernels: int = 4
    horizontal_kernels: int = 8  # per window height
    horizontal_heights: list[int] = field(default_factory=lambda: [1, 2, 3, 4])


@dataclass(frozen=True)
class SASRecConfig:
    heads: int = 1
    attention_layers: int = 2
    attention_size: int = 64


@dataclass(frozen=True)
class CRMConfig:
    model: Literal["sim", "din", "deepfm", "autoint", "dcnv2", "gru4rec", "caser", "sasrec"] = "sim"
    history: Literal["long", "recent"] = "long"  # retrieved hist_long, or the recent k_long
    user_fields: Optional[list[str]] = None  # users.parquet columns to embed; None: every profile field
    # Embed the user id. Off where most evaluated users are unseen in train (a global-time split of
    # a small log: ML-100K), so the model reads a user's taste from the history, not from the id.
    user_id: bool = True
    # SIM, DIN: R_c also holds the mean of the last recent_k behaviours of the (chronological)
    # history, the user's current taste; 0 leaves it out.
    recent_k: int = 10
    item_fields: Optional[list[str]] = None  # items.parquet columns (lists become bags); None: year, genres
    embed_dim: int = 32
    mlp_hidden: list[int] = field(default_factory=lambda: [256, 128])  # the head; R_c is its input
    dropout: float = 0.1
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 1024
    epochs: int = 10
    patience: int = 2  # early stopping on validation AUC
    steps_per_epoch: Optional[int] = None  # cap on training steps per epoch (benchmarks, smoke runs)
    chunk_rows: int = 16384  # rows per Ray Data read task; shuffling is chunk order + a local buffer
    num_workers: int = 2
    cpus_per_worker: float = execution(1.0)
    use_gpu: bool = execution(False)
    max_failures: int = execution(2)
    sim: SIMConfig = field(default_factory=SIMConfig)
    din: DINConfig = field(default_factory=DINConfig)
    deepfm: DeepFMConfig = field(default_factory=DeepFMConfig)
    autoint: AutoIntConfig = field(default_factory=AutoIntConfig)
    dcnv2: DCNv2Config = field(default_factory=DCNv2Config)
    gru4rec: GRU4RecConfig = field(default_factory=GRU4RecConfig)
    caser: CaserConfig = field(default_factory=CaserConfig)
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)

    @property
    def output_name(self) -> str:
        """OUT/crm/<name>: the model, suffixed when it reads the recent instead of the retrieved history."""
        return self.model if self.history == "long" else f"{self.model}-recent"


@dataclass(frozen=True)
class LLMConfig:
    model: str = "lmsys/vicuna-7b-v1.3"  # HF id, local dir, or "smollm2-packaged"
    gguf_file: Optional[str] = None
    # auto: bf16 where the device computes it natively (CUDA with bf16, a CPU with AVX512-BF16 or
    # AMX-BF16), fp16 on CUDA without bf16 (V100), fp32 otherwise. Aliases bf16/fp16/fp32 accepted.
    dtype: Literal["auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"] = "auto"
    load_in_8bit: bool = True
    chat_template: Optional[bool] = None  # None: on when the tokenizer has a chat template
    max_length: int = 1024
    cache_dir: Optional[str] = execution(None)  # where converted GGUF checkpoints are kept


@dataclass(frozen=True)
class LoRAConfig:
    variant: Literal["plora", "lora", "lora_same_params"] = "plora"
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    n_meta: int = 16
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    gate_hidden: int = 60
    gate_dropout: float = 0.1
    temperature: float = 10.0
    # paper: sum_k alpha_k A_k B_k^T (Eq. 11); weights: (sum_k alpha_k A_k)(sum_k alpha_k B_k)^T (authors' code)
    mixing: Literal["paper", "weights"] = "paper"
    gate: Literal["shared", "per_layer"] = "shared"  # one gate for all wrapped layers, or one per layer
    # paper: Linear -> LayerNorm -> ReLU -> Linear (Eq. 13); authors: LayerNorm -> Linear -> ReLU -> Linear
    gate_arch: Literal["paper", "authors"] = "paper"
    # R_c, the CRM layer the gate reads: the vector the CRM's head reads (head_input), or the head's
    # last hidden layer (last_hidden, crm.mlp_hidden[-1] wide: the authors' code). The CRM is the same.
    gate_input: Literal["head_input", "last_hidden"] = added("head_input")


@dataclass(frozen=True)
class TuneConfig:
    variants: list[str] = execution(factory=lambda: ["reclora", "rella", "tallrec"])  # which run, not how
    few_shot: int = 70000
    epochs: int = 5
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0  # linear warm-up from 0 over this share of the steps, then linear decay to 0
    # lm: the language-model loss on the answer tokens (the paper); yes_no: a two-way cross-entropy
    # of softmax(s_yes, s_no) at the answer slot, which is what scoring reads.
    loss: Literal["lm", "yes_no"] = "lm"
    micro_batch: int = 8
    grad_accum: int = 16
    zero_stage: int = 2
    gradient_checkpointing: bool = execution(False)  # recompute activations in backward: 7B tuning on 16 GB GPUs
    num_workers: int = 1
    use_gpu: bool = execution(True)
    max_failures: int = execution(2)
    valid_subsample: Optional[int] = 2000


@dataclass(frozen=True)
class NextItemScoreConfig:
    """Next-item scoring beside the candidate likelihood: iLoRA's generate-and-match form (the LLM
    writes its answer greedily, matched to a candidate title by `next_item.match_answer`), on one
    fixed random subsample of the test sequences (seed run.seed), the same for every LLM row."""

    generate: Optional[int] = 200  # sequences generated for; 0: off; None: every test sequence
    max_new_tokens: int = 32  # a title with its year is 5-20 tokens
    fuzzy_cutoff: float = 0.9  # difflib ratio the fuzzy fallback needs; 1.0: exact rules only


@dataclass(frozen=True)
class ScoreConfig:
    # The LLM rows score one fixed random subsample of the test split (seed run.seed) of this size,
    # the same for every variant; the CRM scores the whole split. None: every LLM row scores it all.
    llm_subsample: Optional[int] = None
    batch_size: int = execution(16)
    concurrency: int = execution(1)
    num_gpus: float = execution(1.0)
    zero_shot: bool = execution(True)  # which rows are scored, not how
    next_item: NextItemScoreConfig = field(default_factory=NextItemScoreConfig)  # not in CTR scoring's fingerprint


@dataclass(frozen=True)
class ServeConfig:
    variant: str = "reclora"  # the tuned variant whose adapter is served (OUT/adapter/<variant>)
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch_size: int = 64  # requests (of any number of candidates) scored together
    batch_wait_timeout_s: float = 0.01  # how long a batch waits to fill
    forward_batch_size: Optional[int] = None  # prompts per forward pass; None: score.batch_size
    max_candidates: int = 200  # per request
    max_history: int = 1000  # supplied behaviours per request
    max_body_bytes: int = 1_000_000
    max_ongoing_requests: int = 128  # per replica; at least max_batch_size, or batches never fill
    # Requests queued (per proxy) while every replica is at max_ongoing_requests; beyond them the
    # service answers 503 with Retry-After: retry_after_s instead of queueing forever. -1: unbounded.
    max_queued_requests: int = 128
    retry_after_s: int = 1
    request_timeout_s: Optional[float] = 60.0  # end to end, queue included; over it: 408. None: no limit
    health_check_period_s: float = 10.0  # how often Serve checks a replica (a dead one is replaced)
    num_replicas: int = 1  # fixed replicas, unless max_replicas > min_replicas turns on autoscaling
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 32.0  # autoscaling target per replica
    num_cpus: float = 1.0  # per replica
    num_gpus: float = 0.0  # per replica


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    retrieve: RetrieveConfig = field(default_factory=RetrieveConfig)
    crm: CRMConfig = field(default_factory=CRMConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    # Where training curves also go (reclora_ray/curves.py); in no stage's fingerprint.
    tracking: Literal["none", "tensorboard", "mlflow", "wandb"] = execution("tensorboard")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def fingerprint_payload(self, *names: str, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
        """The values of the named sections ("crm") or fields ("run.seed") a result depends on:
        execution-only fields (`execution()`), settings added later (`added()`) at their default
        and the dotted `ignore` paths left out."""
        payload: dict[str, Any] = {}
        for name in names:
            node: Any = self
            for part in name.split("."):
                node = getattr(node, part)
            payload[name] = _result_fields(node, name, set(ignore))
        return payload

    def section_hash(self, *sections: str, ignore: tuple[str, ...] = ()) -> str:
        """A short stable hash of the named sections (execution-only fields left out)."""
        payload = self.fingerprint_payload(*sections, ignore=ignore)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _result_fields(value: Any, path: str, ignore: set[str]) -> Any:
    """A config value as plain data, without its execution-only and ignored fields and its
    `added()` fields at their default."""
    if not dataclasses.is_dataclass(value):
        return value
    return {
        f.name: _result_fields(getattr(value, f.name), f"{path}.{f.name}", ignore)
        for f in dataclasses.fields(value)
        if not f.metadata.get(EXECUTION)
        and f"{path}.{f.name}" not in ignore
        and not (f.metadata.get(ADDED) and getattr(value, f.name) == f.default)
    }


# --------------------------------------------------------------------------- loading


def load_config(name_or_path: str = "quickstart", overrides: list[str] | None = None) -> Config:
    """Build a Config from a packaged name or a YAML path, then apply `a.b=value` overrides."""
    raw = _read_with_extends(name_or_path, seen=())
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. crm.lr=1e-3")
        _set_dotted(raw, key.strip(), yaml.safe_load(value))
    return _build(Config, raw, path="")


def _read_with_extends(name_or_path: str, seen: tuple[str, ...]) -> dict[str, Any]:
    text, origin = _read_source(name_or_path)
    if origin in seen:
        raise ConfigError(f"{origin}: 'extends' cycle through {' -> '.join(seen)}")
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping of sections")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    base = _read_with_extends(str(parent), seen + (origin,))
    return _deep_merge(base, raw)


def _read_source(name_or_path: str) -> tuple[str, str]:
    if name_or_path in PACKAGED_CONFIGS:
        ref = resources.files("reclora_ray.configs") / f"{name_or_path}.yaml"
        return ref.read_text(), f"packaged config '{name_or_path}'"
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        return path.read_text(), str(path)
    raise ConfigError(
        f"unknown config {name_or_path!r}: use a packaged name ({', '.join(PACKAGED_CONFIGS)}) "
        "or a path to a .yaml file"
    )


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _set_dotted(raw: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, path: str) -> Any:
    where = path or "config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {_join(path, close[0])}?)" if close else ""
            raise ConfigError(f"{_join(path, key)}: unknown key{hint}")
    values = {}
    for name in names:
        if name in raw:
            values[name] = _coerce(hints[name], raw[name], _join(path, name))
        elif dataclasses.is_dataclass(hints[name]):
            values[name] = _build(hints[name], {}, _join(path, name))
    obj = cls(**values)
    _validate(obj, path)
    return obj


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, path)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "3e-4" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported config type {tp}")


def _validate(obj: Any, path: str) -> None:
    """Range checks that a type alone cannot express."""
    if isinstance(obj, DataConfig):
        if obj.rating_range is not None and (len(obj.rating_range) != 2 or obj.rating_range[0] > obj.rating_range[1]):
            raise ConfigError(f"{_join(path, 'rating_range')}: [min, max] with min <= max, got {obj.rating_range}")
        if len(obj.split) != 3 or any(s <= 0 for s in obj.split) or abs(sum(obj.split) - 1) > 1e-6:
            raise ConfigError(f"{_join(path, 'split')}: three positive fractions summing to 1")
        if obj.k_core < 0 or obj.min_history < 0:
            raise ConfigError(f"{path}: k_core and min_history must be >= 0")
        if obj.dataset == "interactions":
            _validate_files(obj.files, _join(path, "files"))
        elif obj.cold_items:
            raise ConfigError(f"{_join(path, 'cold_items')}: only for dataset 'interactions'")
    if isinstance(obj, TextConfig):
        check_templates(obj, path)
    if isinstance(obj, NextItemDataConfig) and (
        obj.history < 1
        or obj.candidates < 2
        or obj.min_history < 0
        or (obj.max_per_split is not None and obj.max_per_split < 1)
    ):
        raise ConfigError(f"{path}: history >= 1, candidates >= 2, min_history >= 0, max_per_split >= 1 (or null)")
    if isinstance(obj, RetrieveConfig) and (obj.k_long < 1 or obj.k_short < 1):
        raise ConfigError(f"{path}: k_long and k_short must be >= 1")
    if isinstance(obj, EmbedConfig) and (obj.pca_dim < 1 or obj.pca_fit_items < obj.pca_dim):
        raise ConfigError(f"{path}: pca_dim must be >= 1 and pca_fit_items >= pca_dim")
    if isinstance(obj, LoRAConfig) and (obj.r < 1 or obj.n_meta < 1 or obj.temperature <= 0):
        raise ConfigError(f"{path}: r and n_meta must be >= 1 and temperature > 0")
    if isinstance(obj, CRMConfig) and (
        obj.epochs < 1 or obj.batch_size < 1 or obj.num_workers < 1 or obj.chunk_rows < 1 or obj.cpus_per_worker <= 0
    ):
        raise ConfigError(f"{path}: epochs, batch_size, num_workers, chunk_rows must be >= 1, cpus_per_worker > 0")
    if isinstance(obj, TuneConfig):
        if obj.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{_join(path, 'zero_stage')}: one of 0, 1, 2, 3")
    if isinstance(obj, ServeConfig):
        if (
            min(
                obj.max_batch_size,
                obj.max_candidates,
                obj.max_body_bytes,
                obj.max_ongoing_requests,
                obj.num_replicas,
                obj.min_replicas,
            )
            < 1
            or obj.max_history < 0
            or obj.batch_wait_timeout_s < 0
        ):
            raise ConfigError(
                f"{path}: batch, candidate, body, request and replica limits must be >= 1, "
                "max_history and batch_wait_timeout_s >= 0"
            )
        if obj.max_replicas < obj.min_replicas:
            raise ConfigError(f"{_join(path, 'max_replicas')}: {obj.max_replicas} < min_replicas {obj.min_replicas}")
        if obj.forward_batch_size is not None and obj.forward_batch_size < 1:
            raise ConfigError(f"{_join(path, 'forward_batch_size')}: must be >= 1 (or null for score.batch_size)")
    _check_ranges(obj, path)


PROMPT_FIELDS = ("profile", "Subject", "subject", "history", "title")  # data.text.prompt
HISTORY_FIELDS = ("index", "title", "rating", "stars")  # data.text.history_item


def template_fields(template: str) -> list[str]:
    try:
        return [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ValueError(f"template {template!r}: {exc}") from None


def check_templates(text_cfg, path: str) -> None:
    """Config-time check: every template parses and names fields only (no indexing, no formats)."""
    for key in ("description", "profile", "prompt", "history_item"):
        value = getattr(text_cfg, key)
        for i, template in enumerate([value] if isinstance(value, str) else value or []):
            where = f"{path}.{key}[{i}]" if key != "history_item" else f"{path}.{key}"
            try:
                names = template_fields(template)
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            bad = [n for n in names if not n.isidentifier()]
            if bad:
                raise ConfigError(f"{where}: {template!r} names {bad}; use plain field names like {{title}}")
            allowed = {"prompt": PROMPT_FIELDS, "history_item": HISTORY_FIELDS}.get(key)
            unknown = [n for n in names if allowed is not None and n not in allowed]
            if unknown:
                raise ConfigError(f"{where}: unknown fields {unknown}; available: {', '.join(allowed)}")


def _at_least(n: float) -> tuple:
    return (lambda v: v >= n, f">= {n}")


_POSITIVE = (lambda v: v > 0, "> 0")
_FRACTION = (lambda v: 0 <= v <= 1, "in [0, 1]")
_DROPOUT = (lambda v: 0 <= v < 1, "in [0, 1)")
_PORT = (lambda v: 1 <= v <= 65535, "a port in 1..65535")
_RETRIES = (lambda v: v >= -1, ">= 0 (or -1: unlimited)")

# The range of every number with a meaning (None passes: "not set"); a list's every element.
RANGES: dict[type, dict[str, tuple]] = {
    RunConfig: {"num_cpus": _at_least(1)},
    DataConfig: {"test_subsample": _at_least(1), "blocks": _at_least(1)},
    EmbedConfig: {
        "max_length": _at_least(1),
        "batch_size": _at_least(1),
        "concurrency": _at_least(1),
        "num_gpus": _at_least(0),
    },
    RetrieveConfig: {"batch_size": _at_least(1), "concurrency": _at_least(1)},
    SIMConfig: {"attention_layers": _at_least(1), "heads": _at_least(1), "search_k": _at_least(1)},
    DINConfig: {"attention_hidden": _at_least(1)},
    DeepFMConfig: {"dnn_hidden": _at_least(1)},
    AutoIntConfig: {"attention_layers": _at_least(1), "attention_size": _at_least(1), "heads": _at_least(1)},
    DCNv2Config: {"cross_layers": _at_least(1), "dnn_hidden": _at_least(1)},
    GRU4RecConfig: {"gru_layers": _at_least(1), "gru_hidden": _at_least(1)},
    CaserConfig: {
        "vertical_kernels": _at_least(1),
        "horizontal_kernels": _at_least(1),
        "horizontal_heights": _at_least(1),
    },
    SASRecConfig: {"heads": _at_least(1), "attention_layers": _at_least(1), "attention_size": _at_least(1)},
    CRMConfig: {
        "recent_k": _at_least(0),
        "embed_dim": _at_least(1),
        "mlp_hidden": _at_least(1),
        "dropout": _DROPOUT,
        "lr": _POSITIVE,
        "weight_decay": _at_least(0),
        "patience": _at_least(1),
        "steps_per_epoch": _at_least(1),
        "max_failures": _RETRIES,
    },
    LLMConfig: {"max_length": _at_least(1)},
    LoRAConfig: {"alpha": _POSITIVE, "dropout": _DROPOUT, "gate_hidden": _at_least(1), "gate_dropout": _DROPOUT},
    TuneConfig: {
        "few_shot": _at_least(1),
        "epochs": _at_least(1),
        "lr": _POSITIVE,
        "weight_decay": _at_least(0),
        "warmup_ratio": _FRACTION,
        "micro_batch": _at_least(1),
        "grad_accum": _at_least(1),
        "num_workers": _at_least(1),
        "max_failures": _RETRIES,
        "valid_subsample": _at_least(1),
    },
    ScoreConfig: {
        "llm_subsample": _at_least(1),
        "batch_size": _at_least(1),
        "concurrency": _at_least(1),
        "num_gpus": _at_least(0),
    },
    ServeConfig: {
        "port": _PORT,
        "max_replicas": _at_least(1),
        "target_ongoing_requests": _POSITIVE,
        "num_cpus": _at_least(0),
        "num_gpus": _at_least(0),
        "max_queued_requests": (lambda v: v >= 1 or v == -1, ">= 1 (or -1: unbounded)"),
        "retry_after_s": _at_least(0),
        "request_timeout_s": _POSITIVE,
        "health_check_period_s": _POSITIVE,
    },
}


def _check_ranges(obj: Any, path: str) -> None:
    for name, (ok, what) in RANGES.get(type(obj), {}).items():
        value = getattr(obj, name)
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, v in items:
            if v is not None and not ok(v):
                where = _join(path, name) + ("" if i is None else f"[{i}]")
                raise ConfigError(f"{where}: must be {what}, got {v!r}")


def _validate_files(files: DataFilesConfig, path: str) -> None:
    if not files.interactions.paths:
        raise ConfigError(f"{path}.interactions.paths: dataset 'interactions' needs the log's files")
    if not files.items.paths:
        raise ConfigError(f"{path}.items.paths: dataset 'interactions' needs the items' files")
    if files.interactions.rating is None and files.interactions.label is None:
        raise ConfigError(f"{path}.interactions: map a rating or a label column (rating: ..., label: ...)")
    if files.users.fields and not files.users.paths:
        raise ConfigError(f"{path}.users.fields: set without users.paths")


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)
