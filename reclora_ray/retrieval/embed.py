"""`reclora embed`: semantic item embeddings (paper section 3.4).

Each item's text description (items.text) goes through the encoder LLM (`embed.model`, by
default the tuning LLM `llm.model`); the last layer's hidden states are mean-pooled over the
real tokens, reduced with PCA to `embed.pca_dim` and L2-normalised, so retrieval's cosine
similarity is a dot product.

Why mean pooling: in a causal LM the last token's state is shaped for predicting the next
token and is dominated by the end of the text (the genre list); the mean over all tokens keeps
the title as well. ReLLa's "average" embeddings, which RecLoRA retrieves with, are the same.
`embed.pooling: last` is available.

Encoding runs as a Ray Data `map_batches` over an actor pool (`embed.concurrency` actors, each
loading the model once, `embed.num_gpus` each). PCA is fitted on the driver with an SVD of the
centred hidden states: on all items when there are at most `embed.pca_fit_items` of them (ML-1M,
ML-25M); above that (GoodReads-scale, where n_items x hidden would not fit in memory) it is
fitted on a fixed random sample of that many items, and the actors then encode every item again
and project it themselves, so the driver only ever holds pca_dim floats per item.

Outputs (OUT/embeddings): item_embeddings.parquet (item_id, embedding list<float32>),
pca.npz (mean, components, explained_variance_ratio), embed.json, config.yaml.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from reclora_ray.config import Config, LLMConfig
from reclora_ray.console import Progress
from reclora_ray.data.prepared import PreparedData
from reclora_ray.rundir import RunDir, write_json_atomic
from reclora_ray.runtime import init_ray
from reclora_ray.stages import StageRun

log = logging.getLogger(__name__)

EMBEDDINGS_FILE = "item_embeddings.parquet"
PCA_FILE = "pca.npz"


class EmbeddingError(ValueError):
    """An item-embedding file that cannot serve this dataset; the message names the file."""


def run_stage(cfg: Config, run: RunDir, key=None, overwrite: bool = False) -> Path:
    return embed_items(cfg, run, overwrite)


def encoder_config(cfg: Config) -> LLMConfig:
    """The LLM that encodes items: `embed.model` if set, else the tuning LLM."""
    if cfg.embed.model is None or cfg.embed.model == cfg.llm.model:
        return cfg.llm
    return dataclasses.replace(cfg.llm, model=cfg.embed.model, gguf_file=None)


def embed_items(cfg: Config, out: str | Path | RunDir, overwrite: bool = False) -> Path:
    """OUT/embeddings from OUT/data; a no-op when it is already there for this config."""
    stage = StageRun("embed", cfg, out)
    run = stage.run
    if stage.up_to_date(overwrite):
        return run.embeddings
    data = PreparedData.load(run.data, expect_dataset=cfg.data.dataset)
    items = data.items[["item_id", "text"]]
    empty = items["text"].isna() | (items["text"].astype(str).str.strip() == "")
    if empty.any():
        raise EmbeddingError(
            f"{run.data / 'items.parquet'}: item_id {int(items.loc[empty, 'item_id'].iloc[0])} "
            f"(and {int(empty.sum()) - 1} more) has no text to embed"
        )
    init_ray(cfg)
    started = time.time()
    rng = np.random.default_rng(cfg.run.seed)
    fit_all = len(items) <= cfg.embed.pca_fit_items
    fit_items = (
        items if fit_all else items.iloc[np.sort(rng.choice(len(items), cfg.embed.pca_fit_items, replace=False))]
    )
    log.info(
        "encoding %d item texts with %s (%s pooling)", len(fit_items), encoder_config(cfg).model, cfg.embed.pooling
    )
    hidden, dtype = encode(cfg, fit_items)
    log.info("item encoder computed in %s", dtype)
    pca = fit_pca(hidden, cfg.embed.pca_dim)
    log.info(
        "PCA %d -> %d keeps %.1f%% of the variance",
        hidden.shape[1],
        cfg.embed.pca_dim,
        100 * pca["explained_variance_ratio"].sum(),
    )
    if fit_all:
        vectors = project(hidden, pca["mean"], pca["components"])
    else:
        log.info("projecting all %d items in the actor pool", len(items))
        vectors, _ = encode(cfg, items, projection=(pca["mean"], pca["components"]))
    with stage.write() as tmp:
        table = pa.table(
            {
                "item_id": pa.array(items["item_id"].to_numpy(np.int64)),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1]).cast(
                    pa.list_(pa.float32())
                ),
            }
        )
        pq.write_table(table, tmp / EMBEDDINGS_FILE)
        np.savez(tmp / PCA_FILE, **pca)
        write_json_atomic(
            tmp / "embed.json",
            {
                "encoder": encoder_config(cfg).model,
                "dtype": dtype,
                "pooling": cfg.embed.pooling,
                "hidden_size": int(hidden.shape[1]),
                "dim": int(vectors.shape[1]),
                "n_items": len(items),
                "pca_fit_items": len(fit_items),
                "explained_variance": float(pca["explained_variance_ratio"].sum()),
                "seconds": round(time.time() - started, 1),
            },
        )
    log.info("wrote %d item embeddings (dim %d) to %s", len(items), vectors.shape[1], run.embeddings)
    return run.embeddings


def encode(
    cfg: Config, items: pd.DataFrame, projection: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, str]:
    """Hidden states (or unit PCA vectors, with `projection`) of items.text, in row order, and
    the dtype the encoder computed in (llm.dtype resolved on the actors' device)."""
    import ray

    frame = items[["item_id", "text"]].reset_index(drop=True)
    size = cfg.embed.batch_size
    # One block per batch, so every actor of the pool gets work.
    ds = ray.data.from_pandas([frame.iloc[i : i + size] for i in range(0, len(frame), size)])
    ds = ds.map_batches(
        ItemEncoder,
        fn_constructor_kwargs={
            "llm_cfg": encoder_config(cfg),
            "pooling": cfg.embed.pooling,
            "max_length": cfg.embed.max_length,
            "projection": projection,
        },
        batch_size=size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=cfg.embed.concurrency),
        num_gpus=cfg.embed.num_gpus,
    )
    position = pd.Series(np.arange(len(items)), index=items["item_id"].to_numpy())
    out = None
    progress = Progress(log, "encoding items", total=len(items), unit="items")
    dtypes = set()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        dtypes.update(batch["dtype"].tolist())
        vectors = np.stack(batch["embedding"]).astype(np.float32)
        if out is None:
            out = np.empty((len(items), vectors.shape[1]), dtype=np.float32)
        out[position.loc[batch["item_id"]].to_numpy()] = vectors
        progress.update(len(vectors))
    progress.close()
    return out, ", ".join(sorted(dtypes))


class ItemEncoder:
    """A Ray Data actor: loads the encoder once, turns batches of item texts into vectors."""

    def __init__(self, llm_cfg: LLMConfig, pooling: str, max_length: int, projection=None):
        import torch

        from reclora_ray.base_model import load_base

        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.tokenizer = load_base(llm_cfg, self.device)
        self.dtype = str(self.model.dtype).removeprefix("torch.")
        self.tokenizer.padding_side = "right"
        self.pooling = pooling
        self.max_length = max_length
        self.projection = projection

    def __call__(self, batch: pd.DataFrame) -> dict[str, np.ndarray]:
        torch = self.torch
        enc = self.tokenizer(
            list(batch["text"]), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        with torch.inference_mode():
            # The decoder stack alone: its output is the last layer's (normed) hidden states, and
            # the vocabulary projection is never computed.
            hidden = self.model.base_model(
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
            ).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            if self.pooling == "mean":
                pooled = (hidden * mask).sum(1) / mask.sum(1)
            else:
                last = enc["attention_mask"].sum(1) - 1
                pooled = hidden[torch.arange(len(hidden), device=hidden.device), last]
        vectors = pooled.float().cpu().numpy()
        if self.projection is not None:
            vectors = project(vectors, *self.projection)
        return {"item_id": batch["item_id"].to_numpy(), "embedding": list(vectors), "dtype": [self.dtype] * len(batch)}


def fit_pca(hidden: np.ndarray, dim: int) -> dict[str, np.ndarray]:
    """Mean, the top `dim` principal axes (rows, sign-fixed for reproducibility), and the
    share of variance each keeps."""
    n, width = hidden.shape
    if dim > min(n, width):
        raise EmbeddingError(
            f"embed.pca_dim={dim} exceeds what {n} items of hidden size {width} can give "
            f"(at most {min(n, width)}); lower embed.pca_dim"
        )
    x = hidden.astype(np.float64)
    mean = x.mean(0)
    _, singular, vt = np.linalg.svd(x - mean, full_matrices=False)
    components = vt[:dim]
    signs = np.sign(components[np.arange(dim), np.abs(components).argmax(1)])
    variance = singular**2
    return {
        "mean": mean.astype(np.float32),
        "components": (components * signs[:, None]).astype(np.float32),
        "explained_variance_ratio": (variance[:dim] / variance.sum()).astype(np.float32),
    }


def project(hidden: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """PCA projection followed by L2 normalisation: unit vectors of dimension len(components)."""
    reduced = (hidden - mean) @ components.T
    return (reduced / np.linalg.norm(reduced, axis=1, keepdims=True)).astype(np.float32)


def load_item_embeddings(directory: str | Path, n_items: int, dim: int | None = None) -> np.ndarray:
    """Unit item vectors (n_items, dim), row = item_id. Raises EmbeddingError when the file does
    not cover items 0..n_items-1 exactly once, or its dimension is not `dim`."""
    path = Path(directory) / EMBEDDINGS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `reclora embed` first")
    table = pq.read_table(path)
    for column in ("item_id", "embedding"):
        if column not in table.column_names:
            raise EmbeddingError(f"{path}: no column {column!r} (has {table.column_names})")
    item_ids = table.column("item_id").to_numpy().astype(np.int64)
    column = table.column("embedding").combine_chunks()
    lengths = column.value_lengths().to_numpy(zero_copy_only=False)
    width = int(lengths[0]) if len(lengths) else 0
    if len(lengths) and np.any(lengths != width):
        row = int(np.flatnonzero(lengths != width)[0])
        raise EmbeddingError(
            f"{path}: row {row} (item_id {item_ids[row]}) has dimension {lengths[row]}, row 0 has {width}"
        )
    if dim is not None and width != dim:
        raise EmbeddingError(
            f"{path}: embeddings have dimension {width}, the config expects embed.pca_dim={dim}; "
            "re-run `reclora embed --overwrite`"
        )
    outside = (item_ids < 0) | (item_ids >= n_items)
    if outside.any():
        raise EmbeddingError(f"{path}: item_id {item_ids[outside][0]} is outside the dataset's 0..{n_items - 1}")
    counts = np.bincount(item_ids, minlength=n_items)
    if np.any(counts > 1):
        raise EmbeddingError(f"{path}: item_id {int(np.flatnonzero(counts > 1)[0])} appears more than once")
    if np.any(counts == 0):
        missing = np.flatnonzero(counts == 0)
        raise EmbeddingError(
            f"{path} covers {n_items - len(missing)} of {n_items} items; missing item_id "
            f"{', '.join(map(str, missing[:5]))}{' ...' if len(missing) > 5 else ''}; "
            "re-run `reclora embed --overwrite` for this prepared dataset"
        )
    vectors = np.empty((n_items, width), dtype=np.float32)
    vectors[item_ids] = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    norms = np.linalg.norm(vectors, axis=1)
    bad = ~np.isfinite(norms) | (norms == 0)
    if bad.any():
        raise EmbeddingError(f"{path}: item_id {int(np.flatnonzero(bad)[0])} has a zero or non-finite embedding")
    return vectors / norms[:, None]
