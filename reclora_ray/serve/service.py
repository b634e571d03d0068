"""The Ray Serve application: an HTTP ingress in front of the model replicas.

    POST /score                      {"user_id", "candidates": [item_id, ...], "history"?, "timestamp"?,
                                      "as_of_position"?} -> candidates by P(yes), highest first
    GET  /users/{id}/adapter?item_id=I   the user's gate weights over the meta-LoRAs for target I
    POST /users/{id}/adapter/export  {"item_id", "history"?, ...} -> a zip of the user's PEFT LoRA adapter
    GET  /healthz                    ok (200) while a model replica runs, else 503; model version, dataset size
    GET  /stats                      a model replica's batching counters

Two deployments. `ScoringModel` replicas each hold the base LLM, the adapter and the CRM once and
admit serve.max_ongoing_requests requests, serve.max_queued_requests more waiting; beyond them
the service answers 503 with Retry-After. `RecLoRAService`, the ingress, holds no model: it
checks bodies, forwards them through a handle, and answers /healthz from Serve's own view of the
model replicas, so a health probe never waits behind scoring.

Ids are catalogue ids (the logs' own user and item ids, numbers or strings), in requests and
responses; each score says whether its item is a cold start (in the items table, never
interacted with: scored from its text). Concurrent /score requests, from any users, are
gathered by `@serve.batch` (serve.max_batch_size requests, waiting at most
serve.batch_wait_timeout_s) and scored in one `Scorer.score` call; each response says how many
requests and candidates its batch held. A request that arrives while a batch runs joins the
queue when that batch ends, so the next batch gathers everything that arrived meanwhile. Model
work runs on one thread beside the replica's event loop: the adapter layers, which hold the
running batch's gate weights, never see two batches at once.

Bad input is answered 4xx with a message naming the problem and never reaches the model:
malformed JSON, wrong types, unknown fields, empty / oversized candidate lists or histories,
duplicate candidates (422); bodies over serve.max_body_bytes (413); unknown item ids (404, named).
An unknown user is not an error: it is answered as a new user (known_user false).
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' annotations at runtime.
import asyncio
import io
import logging
import shutil
import tempfile
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve import metrics
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from reclora_ray.config import Config, ServeConfig
from reclora_ray.serve.online import OnlineScorer, RequestError, UserState, export_name
from reclora_ray.serve.requests import ExportRequest, ScoreRequest, UserContext, describe

log = logging.getLogger(__name__)

api = FastAPI(title="RecLoRA", description="Personalized LLM scoring of candidate items (RecLoRA on Ray Serve)")


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(status_code=422, content={"detail": describe(exc.errors())})


@serve.deployment
class ScoringModel:
    """One model replica: the base LLM, the adapter and the CRM. Raises `RequestError` for what
    the data cannot answer (an unknown item, a history past its limit)."""

    def __init__(self, cfg: Config, out: str):
        if cfg.serve.num_gpus == 0:  # a CPU replica computes on as many threads as it reserves CPUs
            torch.set_num_threads(max(1, int(cfg.serve.num_cpus)))
        self.limits = cfg.serve
        self.online = OnlineScorer(cfg, out, cfg.serve.variant)
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reclora-model")
        self.no_batch_running = asyncio.Event()
        self.no_batch_running.set()
        self.score_batch.set_max_batch_size(cfg.serve.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(cfg.serve.batch_wait_timeout_s)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.batch_sizes: Counter[int] = Counter()
        self.scored_candidates = 0
        self.batch_metric = metrics.Histogram(
            "reclora_batch_requests",
            description="requests scored together in one batch",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128],
        )
        log.info("replica %s serves %s (%s)", self.replica, self.online.variant.name, self.online.version)

    async def _on_model_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.model_thread, fn, *args)

    def _state(self, user_id, context: UserContext, target_items: list, what: str) -> tuple[UserState, np.ndarray]:
        """The user's state and the dense ids of the target items (catalogue ids checked)."""
        if len(context.history) > self.limits.max_history:
            raise RequestError(
                422,
                f"history: {len(context.history)} behaviours, more than serve.max_history={self.limits.max_history}",
            )
        targets = self.online.check_items(target_items, what)
        state = self.online.user_state(
            user_id,
            [b.item_id for b in context.history],
            [b.rating for b in context.history],
            context.timestamp,
            context.as_of_position,
        )
        return state, targets

    def _user(self, state: UserState) -> dict:
        return {
            "user_id": state.raw_user_id,
            "known_user": state.known_user,
            "cold_start": state.cold_start,
            "history_length": len(state.items),
            "timestamp": state.timestamp,
            "model_version": self.online.version,
        }

    @serve.batch
    async def score_batch(self, jobs: list[tuple[UserState, np.ndarray]]) -> list[tuple[np.ndarray, dict]]:
        states, candidates = [job[0] for job in jobs], [job[1] for job in jobs]
        self.no_batch_running.clear()
        try:
            probs = await self._on_model_thread(self.online.score, states, candidates)
        finally:
            self.no_batch_running.set()
        batch = {"requests": len(jobs), "candidates": int(sum(len(c) for c in candidates))}
        self.batch_sizes[len(jobs)] += 1
        self.scored_candidates += batch["candidates"]
        self.batch_metric.observe(len(jobs))
        return [(p, batch) for p in probs]

    async def score(self, body: ScoreRequest) -> dict:
        state, items = self._state(body.user_id, body, body.candidates, "candidates")
        # Serve forms batches eagerly (one per batch_wait_timeout_s, queued behind the running one):
        # joining the queue only when no batch runs puts all that arrived meanwhile into the next one.
        await self.no_batch_running.wait()
        probs, batch = await self.score_batch((state, items))
        order = np.argsort(-probs, kind="stable")
        catalogue = self.online.catalogue
        return {
            **self._user(state),
            "scores": [
                {
                    "item_id": catalogue.item_raw[items[i]],
                    "p_yes": float(probs[i]),
                    "cold_start_item": bool(catalogue.cold_items[items[i]]),
                }
                for i in order
            ],
            "batch": batch,
        }

    async def gate(self, user_id: str, context: UserContext, item_id: str) -> dict:
        state, (item,) = self._state(user_id, context, [item_id], "item_id")
        gate = await self._on_model_thread(self.online.gate, state, int(item))
        return {
            **self._user(state),
            "item_id": self.online.catalogue.item_raw[item],
            "variant": self.online.variant.name,
            "n_meta": gate.shape[-1],
            "gate": gate.tolist(),
        }

    async def export_adapter(self, user_id: str, body: ExportRequest) -> tuple[str, bytes]:
        """(file name, zip bytes) of the user's PEFT adapter: bytes, as the ingress may run elsewhere."""
        state, (item,) = self._state(user_id, body, [body.item_id], "item_id")
        name = export_name(self.online.variant.name, user_id, body.item_id)
        workdir = Path(tempfile.mkdtemp(prefix="reclora-export-"))
        try:
            await self._on_model_thread(self.online.export_adapter, state, int(item), workdir / name)
            archive = io.BytesIO()
            with zipfile.ZipFile(archive, "w") as zf:  # stored: safetensors do not compress
                for path in sorted((workdir / name).iterdir()):
                    zf.write(path, f"{name}/{path.name}")
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return f"{name}.zip", archive.getvalue()

    async def stats(self) -> dict:
        batches = sum(self.batch_sizes.values())
        requests = sum(size * n for size, n in self.batch_sizes.items())
        return {
            "replica": self.replica,
            "model_version": self.online.version,
            "batches": batches,
            "requests": requests,
            "candidates": self.scored_candidates,
            "max_batch_requests": max(self.batch_sizes, default=0),
            "mean_batch_requests": requests / batches if batches else 0.0,
            "batch_requests_histogram": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "torch_threads": torch.get_num_threads(),
        }


def running_model_replicas() -> int:
    """Serve's count of RUNNING replicas of this application's model deployment."""
    app = serve.status().applications.get(serve.get_replica_context().app_name)
    deployment = app.deployments.get(ScoringModel.name) if app is not None else None
    return int(deployment.replica_states.get("RUNNING", 0)) if deployment is not None else 0


@serve.deployment
@serve.ingress(api)
class RecLoRAService:
    """The ingress: body checks that need no data, then the model through `model`."""

    def __init__(self, limits: ServeConfig, info: dict, model: DeploymentHandle):
        self.limits, self.info, self.model = limits, info, model

    def _unavailable(self, why: str) -> HTTPException:
        return HTTPException(503, why, headers={"Retry-After": str(self.limits.retry_after_s)})

    async def _call(self, method: str, *args):
        try:
            return await getattr(self.model, method).remote(*args)
        except BackPressureError:
            raise self._unavailable(
                f"every model replica is busy and {self.limits.max_queued_requests} requests wait; retry later"
            ) from None
        except RequestError as exc:  # raised in the replica; Ray re-raises it as a subclass of both
            cause = getattr(exc, "cause", exc)
            raise HTTPException(cause.status, str(cause)) from None
        except RayActorError:
            raise self._unavailable("the model replica is gone; Serve is starting another") from None

    async def _body(self, request: Request, model: type[BaseModel]) -> BaseModel:
        limit = self.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and not declared.isdigit():
            raise HTTPException(400, f"Content-Length {declared!r} is not a byte count")
        if declared is not None and int(declared) > limit:
            raise HTTPException(413, f"body of {declared} bytes is over serve.max_body_bytes={limit}")
        body = await request.body()
        if len(body) > limit:
            raise HTTPException(413, f"body of {len(body)} bytes is over serve.max_body_bytes={limit}")
        try:
            return model.model_validate_json(body)
        except ValidationError as exc:
            raise HTTPException(422, describe(exc)) from None

    @api.post("/score")
    async def score(self, request: Request) -> dict:
        body = await self._body(request, ScoreRequest)
        if len(body.candidates) > self.limits.max_candidates:
            raise HTTPException(
                422,
                f"candidates: {len(body.candidates)} items, more than "
                f"serve.max_candidates={self.limits.max_candidates}",
            )
        duplicates = [item for item, n in Counter(str(c) for c in body.candidates).items() if n > 1]
        if duplicates:
            raise HTTPException(422, f"candidates: duplicate item ids {duplicates}")
        return await self._call("score", body)

    @api.get("/users/{user_id}/adapter")
    async def adapter(
        self,
        user_id: str,
        item_id: str = Query(min_length=1, max_length=256, description="target item"),
        timestamp: Optional[int] = Query(None, ge=0, lt=2**62),
        as_of_position: Optional[int] = Query(None, ge=0),
    ) -> dict:
        context = UserContext(timestamp=timestamp, as_of_position=as_of_position)
        return await self._call("gate", user_id, context, item_id)

    @api.post("/users/{user_id}/adapter/export")
    async def export_adapter(self, user_id: str, request: Request) -> Response:
        body = await self._body(request, ExportRequest)
        filename, archive = await self._call("export_adapter", user_id, body)
        return Response(
            archive,
            media_type="application/zip",
            headers={
                "Content-Disposition": f'attachment; filename="{filename}"',
                "X-Model-Version": self.info["model_version"],
            },
        )

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        replicas = await asyncio.to_thread(running_model_replicas)
        status = "ok" if replicas else "unavailable"
        return JSONResponse(
            {"status": status, **self.info, "model_replicas": replicas}, status_code=200 if replicas else 503
        )

    @api.get("/stats")
    async def stats(self) -> dict:
        return await self._call("stats")
