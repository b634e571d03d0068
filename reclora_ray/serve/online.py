"""The online scoring core, without Ray Serve: requests' histories -> the batch scorer.

A request names a user, its candidates, a scoring time and optionally behaviours the prepared
data does not hold yet. The user's history is their whole prepared sequence (online we score
"now", after every known behaviour) followed by the supplied behaviours (lifelong: a new
behaviour changes the next answer without retraining). `as_of_position=N` keeps only the first
N known behaviours instead, which replays an offline sample (its `pos`) exactly.

Per candidate, the long and short histories are retrieved from that history by the same
`HistoryRetriever` as `reclora retrieve` (or taken as the recent K, as the variant says), and
`Scorer.score` does the rest, so a request scores exactly as `reclora score` scores the same
sample. Users and items are named by their catalogue (raw) ids (`Catalogue`); an unknown item
is an error naming it, while a user the prepared data does not know gets the CRM's unknown-user
code and a prompt without a profile; with no behaviours at all the answer is a cold start (R_c
from an empty history), which the caller flags, as it flags cold-start items (in the items table,
never interacted with: scored from their text).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from reclora_ray.config import Config
from reclora_ray.data.catalogue import Catalogue, UnknownIds
from reclora_ray.llm.histories import Histories
from reclora_ray.llm.inputs import to_device
from reclora_ray.llm.score import Scorer
from reclora_ray.retrieval.embed import load_item_embeddings
from reclora_ray.retrieval.history import HistoryRetriever
from reclora_ray.rundir import RunDir, identity, read_marker
from reclora_ray.stages import StageRun
from reclora_ray.variants import Variant


class RequestError(ValueError):
    """A request the data cannot answer; `status` is the HTTP status it maps to. Both are its
    args, so it pickles whole from a model replica to the ingress."""

    def __init__(self, status: int, message: str):
        super().__init__(status, message)
        self.status, self.message = status, message

    def __str__(self) -> str:
        return self.message


@dataclass
class UserState:
    """One user's state at scoring time: their behaviours, oldest first."""

    user_id: int  # dense; -1 for a user the prepared data does not know
    raw_user_id: object  # the catalogue id the request named
    timestamp: int
    items: np.ndarray  # int32
    ratings: np.ndarray  # float32
    known_user: bool

    @property
    def cold_start(self) -> bool:
        return len(self.items) == 0


def serving_config(cfg: Config) -> Config:
    """The scorer's settings for serving: the replica's GPUs and the serve forward batch."""
    score = dataclasses.replace(
        cfg.score, num_gpus=cfg.serve.num_gpus, batch_size=cfg.serve.forward_batch_size or cfg.score.batch_size
    )
    return dataclasses.replace(cfg, score=score)


def model_version(cfg: Config, run: RunDir, variant: Variant) -> str:
    """What is served: the adapter's identity (which includes the identities of the outputs it was
    tuned on) and a hash of its weights and of the identities of the outputs served with it now
    (data, retrieval, CRM), so retraining any of them changes the version; without an adapter,
    the variant name and that hash."""
    upstream = [path for stage, _, path in StageRun("score", cfg, run, variant.name).inputs if stage.name != "tune"]
    digest = hashlib.sha256(json.dumps([identity(p) for p in upstream]).encode())
    if variant.adapter is None:
        return f"{variant.name}.{digest.hexdigest()[:8]}"
    directory = run.adapter(variant.name)
    marker = read_marker(directory)
    if marker is None:
        raise FileNotFoundError(f"{directory} holds no finished adapter; run `reclora tune` first")
    from reclora_ray.llm.plora import adapter_files

    with open(adapter_files(directory)[0], "rb") as weights:
        for chunk in iter(lambda: weights.read(1 << 20), b""):
            digest.update(chunk)
    return f"{identity(directory)}.{digest.hexdigest()[:8]}"


def export_name(variant: str, raw_user_id, raw_item_id) -> str:
    """The folder name of an exported adapter: the variant and the catalogue ids, filename-safe."""
    safe = lambda raw: "".join(c if c.isalnum() or c in "-_." else "_" for c in str(raw))  # noqa: E731
    return f"{variant}-user{safe(raw_user_id)}-item{safe(raw_item_id)}"


class OnlineScorer:
    """The batch `Scorer` plus each user's prepared sequence and the retriever."""

    def __init__(self, cfg: Config, out: str | Path, variant_name: str):
        run = RunDir(out)
        self.scorer = Scorer(serving_config(cfg), str(out), variant_name)
        self.variant = self.scorer.variant
        self.data = self.scorer.data
        self.sequences = self.data.sequences
        self.catalogue = Catalogue.from_prepared(self.data)
        # The variant's recent lists are the last K; its semantic ones are what `reclora retrieve` wrote.
        modes = {
            name: "recent" if getattr(self.variant, name) == "recent" else getattr(cfg.retrieve, name)
            for name in ("long_mode", "short_mode")
        }
        embeddings = None
        if "semantic" in modes.values():
            embeddings = load_item_embeddings(run.embeddings, self.data.n_items, dim=cfg.embed.pca_dim)
        self.retriever_args = dict(
            embeddings=embeddings, k_long=cfg.retrieve.k_long, k_short=cfg.retrieve.k_short, **modes
        )
        self.version = model_version(cfg, run, self.variant)

    def check_items(self, raw_item_ids, what: str) -> np.ndarray:
        """The dense ids of catalogue item ids; 404 naming those the items table does not hold."""
        try:
            return self.catalogue.items(list(raw_item_ids), what)
        except UnknownIds as exc:
            raise RequestError(404, f"{exc} (not in the items table of {self.data.root})") from None

    def user_state(
        self,
        raw_user_id,
        history_items=(),
        history_ratings=(),
        timestamp: int | None = None,
        as_of_position: int | None = None,
    ) -> UserState:
        """The user's known behaviours (all, or the first as_of_position) + the supplied ones
        (catalogue item ids)."""
        dense = self.catalogue.user(raw_user_id)
        known_user = dense is not None
        user_id = dense if known_user else -1
        if known_user:  # as the catalogue types it: a path's "12" is the user 12
            raw_user_id = self.catalogue.user_raw[dense]
        length = int(self.sequences.length(np.array([user_id]))[0]) if known_user else 0
        if as_of_position is not None and as_of_position > length:
            who = (
                f"user {raw_user_id!r} has {length} known behaviours"
                if known_user
                else f"user {raw_user_id!r} is unknown"
            )
            raise RequestError(422, f"as_of_position {as_of_position} is past the known history: {who}")
        history_items = self.check_items(history_items, "history")
        keep = length if as_of_position is None else as_of_position
        start = int(self.sequences.offsets[user_id]) if known_user else 0
        items = np.concatenate(
            [self.sequences.item_ids[start : start + keep], np.asarray(history_items, dtype=np.int32)]
        )
        ratings = np.concatenate(
            [self.sequences.ratings[start : start + keep], np.asarray(history_ratings, dtype=np.float32)]
        )
        return UserState(
            user_id, raw_user_id, int(time.time()) if timestamp is None else timestamp, items, ratings, known_user
        )

    def histories(self, states: list[UserState], candidates: list[np.ndarray]) -> Histories:
        """Per candidate, the long and short histories retrieved from its state's behaviours,
        in the order of np.concatenate(candidates)."""
        lengths = np.array([len(s.items) for s in states], dtype=np.int64)
        offsets = np.zeros(len(states) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        items = np.concatenate([s.items for s in states]) if states else np.zeros(0, np.int32)
        ratings = np.concatenate([s.ratings for s in states]) if states else np.zeros(0, np.float32)
        retriever = HistoryRetriever(offsets=offsets, seq_items=items, **self.retriever_args)
        owner = np.repeat(np.arange(len(states)), [len(c) for c in candidates])
        hist_long, hist_short = retriever.retrieve(owner, np.concatenate(candidates), lengths[owner])

        def gather(indices):  # -1 padding -> item -1, rating 0, as `Sequences.gather`
            valid = indices >= 0
            flat = (offsets[owner][:, None] + indices)[valid]
            hist_items, hist_ratings = np.full(indices.shape, -1, np.int64), np.zeros(indices.shape, np.float32)
            hist_items[valid], hist_ratings[valid] = items[flat], ratings[flat]
            return hist_items, hist_ratings

        long = gather(hist_long) if self.variant.uses_crm else (None, None)
        return Histories(*gather(hist_short), *long)

    def score(self, states: list[UserState], candidates: list[np.ndarray]) -> list[np.ndarray]:
        """P(yes) of every state's candidates, all through one `Scorer.score` call."""
        owner = np.repeat(np.arange(len(states)), [len(c) for c in candidates])
        users = np.array([s.user_id for s in states], dtype=np.int64)[owner]
        timestamps = np.array([s.timestamp for s in states], dtype=np.int64)[owner]
        probs, _ = self.scorer.score(users, np.concatenate(candidates), timestamps, self.histories(states, candidates))
        return np.split(probs, np.cumsum([len(c) for c in candidates])[:-1])

    @torch.inference_mode()
    def crm_repr(self, state: UserState, item_id: int) -> torch.Tensor:
        """R_c (1, gate input width) of the user for one target item: what the gate reads."""
        if not self.variant.uses_crm:
            raise RequestError(
                409,
                f"the served variant {self.variant.name!r} has no per-user gate "
                "(only the personalized LoRA, e.g. 'reclora', has one)",
            )
        hist = self.histories([state], [np.array([item_id])])
        features = self.scorer.inputs.crm_features(
            np.array([state.user_id]), np.array([item_id]), np.array([state.timestamp]), hist
        )
        return self.scorer.model.crm_repr(to_device(features, self.scorer.device))

    @torch.inference_mode()
    def gate(self, state: UserState, item_id: int) -> np.ndarray:
        """The user's mixing weights over the meta-LoRAs for this target: (N_m,) or (layers, N_m)."""
        from reclora_ray.llm.plora import unwrap

        return unwrap(self.scorer.model.llm).gate_weights(self.crm_repr(state, item_id))[0].float().cpu().numpy()

    def export_adapter(self, state: UserState, item_id: int, out_dir: Path) -> None:
        """The user's personalized adapter for this target as a standard PEFT LoRA adapter."""
        from reclora_ray.llm.plora import export_user_adapter

        if self.variant.adapter is None:
            raise RequestError(409, f"the served variant {self.variant.name!r} has no adapter to export")
        crm_repr = self.crm_repr(state, item_id)[0] if self.variant.uses_crm else None
        export_user_adapter(self.scorer.model.llm, crm_repr, out_dir)
