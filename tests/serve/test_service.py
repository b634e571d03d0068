"""The Serve application on loopback, on a tuned tiny run: same numbers as the batch scorer,
lifelong histories, cold start, batching across users, gate and adapter export, bad input.
Requests and responses name users and items by their catalogue (ML-100K) ids."""

import io
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import torch

from reclora_ray.config import load_config
from reclora_ray.data.catalogue import Catalogue
from reclora_ray.llm.histories import load_samples
from reclora_ray.llm.score import Scorer
from reclora_ray.rundir import RunDir
from reclora_ray.variants import get_variant

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def scorer(tuned_run, serve_config) -> Scorer:
    """The batch path in this process: what a `reclora score` actor runs."""
    return Scorer(serve_config, str(tuned_run), "reclora")


@pytest.fixture(scope="module")
def samples(tuned_run, scorer) -> pd.DataFrame:
    """Test samples with short and long histories (pos from 0-ish to far past k_long), and the
    batch scorer's P(yes) and gate weights for them."""
    rows = load_samples(RunDir(tuned_run).data, "test", get_variant("reclora"))
    rows = rows.sort_values("pos", ignore_index=True)
    picked = rows.iloc[np.linspace(0, len(rows) - 1, 10).astype(int)].reset_index(drop=True)
    scored = scorer(picked)
    ids = Catalogue.from_prepared(scorer.data)
    return picked.assign(
        p_yes=scored["p_yes"],
        gate=scored["gate"],
        raw_user=ids.user_raw[picked["user_id"]],
        raw_item=ids.item_raw[picked["item_id"]],
    )


@pytest.fixture(scope="module")
def catalogue(scorer) -> Catalogue:
    return Catalogue.from_prepared(scorer.data)


def post_all(client, bodies: list[dict], path: str = "/score") -> list:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda body: client.post(path, json=body), bodies))


def as_of(sample, **extra) -> dict:
    """A request that sees exactly what the batch sample saw: the user's first `pos` behaviours."""
    return {
        "user_id": sample.raw_user,
        "candidates": [sample.raw_item],
        "timestamp": int(sample.timestamp),
        "as_of_position": int(sample.pos),
        **extra,
    }


def test_scores_equal_the_batch_scorer_and_supplied_history_is_appended(service, samples, scorer, catalogue):
    _, client = service
    replies = post_all(client, [as_of(s) for s in samples.itertuples()])
    assert [r.status_code for r in replies] == [200] * len(samples)
    online = np.array([r.json()["scores"][0]["p_yes"] for r in replies])
    np.testing.assert_allclose(online, samples["p_yes"], atol=1e-5)
    assert [r.json()["history_length"] for r in replies] == samples["pos"].tolist()

    # Lifelong: the known prefix minus its last 3 behaviours plus those 3 supplied in the request.
    seqs = scorer.data.sequences
    bodies = []
    for s in samples[samples["pos"] >= 3].itertuples():
        start = seqs.offsets[s.user_id] + s.pos - 3
        history = [
            {
                "item_id": catalogue.item_raw[seqs.item_ids[i]],
                "rating": float(seqs.ratings[i]),
                "timestamp": int(seqs.timestamps[i]),
            }
            for i in range(start, start + 3)
        ]
        bodies.append(as_of(s, as_of_position=int(s.pos) - 3, history=history))
    appended = np.array([r.json()["scores"][0]["p_yes"] for r in post_all(client, bodies)])
    np.testing.assert_allclose(appended, samples[samples["pos"] >= 3]["p_yes"], atol=1e-5)

    # Other candidates in the same request leave a candidate's score unchanged; output is sorted.
    last = samples.iloc[-1]
    others = [catalogue.item_raw[i] for i in range(20) if i != last.item_id][:6]
    reply = client.post("/score", json=as_of(last, candidates=others + [last.raw_item])).json()
    ranked = reply["scores"]
    assert sorted(s["item_id"] for s in ranked) == sorted(others + [last.raw_item])
    assert [s["p_yes"] for s in ranked] == sorted((s["p_yes"] for s in ranked), reverse=True)
    assert not any(s["cold_start_item"] for s in ranked) and reply["user_id"] == last.raw_user
    mine = next(s["p_yes"] for s in ranked if s["item_id"] == last.raw_item)
    assert mine == pytest.approx(last.p_yes, abs=1e-5)
    assert reply["model_version"].startswith("reclora-")


def test_a_new_behaviour_changes_the_answer_and_unknown_users_are_cold_starts(service, scorer, catalogue):
    _, client = service
    n_users = scorer.data.n_users
    body = {"user_id": 3, "candidates": [10, 11, 12], "timestamp": 1_000_000_000}
    before = client.post("/score", json=body).json()
    after = client.post("/score", json=body | {"history": [{"item_id": 10, "rating": 1.0}]}).json()
    user3 = catalogue.user(3)  # the catalogue's user 3 is the prepared data's user 2
    assert user3 == 2 and before["user_id"] == 3
    assert (
        after["history_length"]
        == before["history_length"] + 1
        == scorer.data.sequences.length(np.array([user3]))[0] + 1
    )
    assert not before["cold_start"] and before["known_user"]
    p = lambda reply: {s["item_id"]: s["p_yes"] for s in reply["scores"]}  # noqa: E731
    assert p(before) != p(after)

    cold = client.post("/score", json={"user_id": n_users + 7, "candidates": [10, 11]}).json()
    assert cold["cold_start"] and not cold["known_user"] and cold["history_length"] == 0
    assert all(0 < s["p_yes"] < 1 for s in cold["scores"])
    warm = client.post(
        "/score", json={"user_id": n_users + 7, "candidates": [10, 11], "history": [{"item_id": 5, "rating": 5.0}]}
    ).json()
    assert not warm["cold_start"] and not warm["known_user"] and warm["history_length"] == 1
    # A known user replayed before any behaviour is a cold start too.
    assert client.post("/score", json={"user_id": 3, "candidates": [10], "as_of_position": 0}).json()["cold_start"]


def test_concurrent_requests_from_many_users_are_batched(service):
    _, client = service
    before = client.get("/stats").json()
    replies = post_all(client, [{"user_id": u, "candidates": [1, 2, 3]} for u in range(16)])
    assert all(r.status_code == 200 for r in replies)
    sizes = [r.json()["batch"]["requests"] for r in replies]
    assert max(sizes) > 1 and max(sizes) <= 8  # serve.max_batch_size
    assert all(r.json()["batch"]["candidates"] == 3 * r.json()["batch"]["requests"] for r in replies)
    after = client.get("/stats").json()
    assert after["requests"] - before["requests"] == 16
    assert after["candidates"] - before["candidates"] == 48
    assert after["batches"] - before["batches"] < 16
    assert after["max_batch_requests"] >= max(sizes)
    assert after["torch_threads"] == 1  # serve.num_cpus of the CPU replica


def test_healthz_names_the_served_model_from_the_ingress(service, scorer):
    _, client = service
    health = client.get("/healthz")
    assert health.status_code == 200 and health.json() == {
        "status": "ok",
        "variant": "reclora",
        "model_version": client.get("/stats").json()["model_version"],
        "users": scorer.data.n_users,
        "items": scorer.data.n_items,
        "model_replicas": 1,
    }


def test_gate_weights_and_exported_peft_adapter_reproduce_the_user(service, samples, scorer, serve_config, tmp_path):
    from peft import PeftModel

    from reclora_ray.base_model import load_base
    from reclora_ray.llm.collate import p_yes

    _, client = service
    s = samples.iloc[-1]
    params = {"item_id": s.raw_item, "timestamp": int(s.timestamp), "as_of_position": int(s.pos)}
    params["item_id"] = s.raw_item
    reply = client.get(f"/users/{s.raw_user}/adapter", params=params).json()
    assert reply["n_meta"] == serve_config.lora.n_meta
    np.testing.assert_allclose(reply["gate"], s.gate, atol=1e-6)
    assert sum(reply["gate"]) == pytest.approx(1, abs=1e-5)

    assert reply["item_id"] == s.raw_item and reply["user_id"] == s.raw_user
    export = client.post(f"/users/{s.raw_user}/adapter/export", json=params)
    assert export.status_code == 200 and export.headers["content-type"] == "application/zip"
    assert export.headers["x-model-version"] == reply["model_version"]
    with zipfile.ZipFile(io.BytesIO(export.content)) as zf:
        zf.extractall(tmp_path)
        (adapter_dir,) = {name.split("/")[0] for name in zf.namelist()}
    assert adapter_dir == f"reclora-user{s.raw_user}-item{s.raw_item}"
    assert sorted(p.name for p in (tmp_path / adapter_dir).iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    base, _ = load_base(serve_config.llm, device="cpu")
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / adapter_dir)).eval()
    row = samples.iloc[[-1]].reset_index(drop=True)
    users, items, stamps = row["user_id"].to_numpy(), row["item_id"].to_numpy(), row["timestamp"].to_numpy()
    ((_, batch),) = scorer.inputs.scoring_batches(users, items, stamps, scorer.inputs.histories(row), 1)
    with torch.no_grad():
        logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, -1]
    collator = scorer.inputs.collator
    assert p_yes(logits[:, list(collator.yes_no)]).item() == pytest.approx(s.p_yes, abs=1e-4)


BAD_SCORE_BODIES = [
    (b"{bad json", 422, "Invalid JSON"),
    (b"[1, 2]", 422, "object"),
    (b'{"user_id": 1.5, "candidates": [1]}', 422, "user_id"),
    (b'{"user_id": 12, "candidates": "1,2"}', 422, "candidates"),
    (b'{"user_id": 12, "candidates": [1, 2.5]}', 422, "candidates.1"),
    (b'{"user_id": 12, "candidates": [true]}', 422, "candidates.0"),
    (b'{"user_id": 12}', 422, "candidates: Field required"),
    (b'{"user_id": 12, "candidates": []}', 422, "at least 1"),
    (b'{"user_id": 12, "candidates": [' + b",".join(b"%d" % i for i in range(21)) + b"]}", 422, "max_candidates=20"),
    (b'{"user_id": 12, "candidates": [4, 4]}', 422, "duplicate item ids ['4']"),
    (b'{"user_id": 12, "candidates": [4, "4"]}', 422, "duplicate item ids ['4']"),
    (b'{"user_id": -1, "candidates": [1]}', 422, "user_id"),
    (b'{"user_id": 12, "candidates": [1], "candidate": [2]}', 422, "candidate: Extra inputs"),
    (b'{"user_id": 12, "candidates": [1, 99999, "sku-5"]}', 404, "[99999, 'sku-5']"),
    (b'{"user_id": 12, "candidates": [1], "history": [{"item_id": 77777, "rating": 4}]}', 404, "[77777]"),
    (b'{"user_id": 12, "candidates": [1], "history": [{"item_id": 7, "rating": 9}]}', 422, "history.0.rating"),
    (
        b'{"user_id": 12, "candidates": [1], "history": [{"item_id": 7, "rating": 4, "timestamp": 9},'
        b' {"item_id": 8, "rating": 4, "timestamp": 3}]}',
        422,
        "oldest first",
    ),
    (
        b'{"user_id": 12, "candidates": [1], "history": [' + b",".join([b'{"item_id": 7, "rating": 4}'] * 51) + b"]}",
        422,
        "max_history=50",
    ),
    (b'{"user_id": 12, "candidates": [1], "as_of_position": 100000}', 422, "as_of_position"),
    (b'{"user_id": 12, "candidates": [1], "pad": "' + b"x" * 20000 + b'"}', 413, "max_body_bytes=20000"),
]


def test_bad_input_gets_a_4xx_naming_the_problem_and_the_replica_lives_on(service):
    _, client = service
    replica = client.get("/stats").json()["replica"]
    for body, status, words in BAD_SCORE_BODIES:
        reply = client.post("/score", content=body, headers={"content-type": "application/json"})
        assert (reply.status_code, words in reply.json()["detail"]) == (status, True), (body[:80], reply.text)
    for path, status, words in [
        ("/users/12/adapter", 422, "item_id"),
        ("/users/12/adapter?item_id=99999", 404, "['99999']"),
        ("/users/12/adapter?item_id=1&as_of_position=-2", 422, "as_of_position"),
    ]:
        reply = client.get(path)
        assert (reply.status_code, words in reply.json()["detail"]) == (status, True), (path, reply.text)
    reply = client.post("/users/12/adapter/export", json={"item_id": 99999})
    assert reply.status_code == 404 and "[99999]" in reply.json()["detail"]
    stranger = client.get("/users/someone-new/adapter?item_id=1")  # an unknown user is a new user, not an error
    assert (
        stranger.status_code == 200
        and not stranger.json()["known_user"]
        and stranger.json()["user_id"] == "someone-new"
    )
    reply = client.post("/users/12/adapter/export", json={})
    assert reply.status_code == 422 and "item_id" in reply.json()["detail"]
    assert client.get("/stats").json()["replica"] == replica
    assert client.post("/score", json={"user_id": 12, "candidates": [1]}).status_code == 200


def test_export_adapter_command_writes_the_services_adapter_and_a_merged_model(service, samples, tuned_run, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from reclora_ray.base_model import load_base
    from reclora_ray.cli import main as cli_main
    from tests.conftest import TINY_OVERRIDES

    _, client = service
    s = samples.iloc[-1]
    stamp = int(s.timestamp)
    served = client.post(f"/users/{s.raw_user}/adapter/export", json={"item_id": s.raw_item, "timestamp": stamp})
    with zipfile.ZipFile(io.BytesIO(served.content)) as zf:
        zf.extractall(tmp_path / "served")
        (name,) = {n.split("/")[0] for n in zf.namelist()}
    base_args = [
        "export-adapter",
        "--config",
        "tiny",
        *(a for o in TINY_OVERRIDES for a in ("--set", o)),
        "--run",
        str(tuned_run),
        "--user",
        str(s.raw_user),
        "--item",
        str(s.raw_item),
        "--timestamp",
        str(stamp),
    ]
    assert cli_main([*base_args, "--out", str(tmp_path / "cli")]) == 0
    served_tensors = load_file(tmp_path / "served" / name / "adapter_model.safetensors")
    cli_tensors = load_file(tmp_path / "cli" / "adapter_model.safetensors")
    assert served_tensors.keys() == cli_tensors.keys()
    # The same adapter up to float summation order: the replica and this process may run different
    # thread counts, so the CRM forward and the gate's mix can differ in the last bits (a wrong
    # history or gate would differ by orders of magnitude more).
    for k in served_tensors:
        torch.testing.assert_close(served_tensors[k], cli_tensors[k], rtol=1e-5, atol=1e-7, msg=k)

    assert cli_main([*base_args, "--out", str(tmp_path / "merged"), "--merge"]) == 0
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    cfg = load_config("tiny", TINY_OVERRIDES)
    base, _ = load_base(cfg.llm, device="cpu")
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "cli")).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    input_ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=input_ids).logits, peft_model(input_ids=input_ids).logits, atol=1e-4, rtol=0
        )
    assert cli_main([*base_args[:-4], "--item", "no-such-item", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
