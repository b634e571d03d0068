"""Sweep mechanics on a real local Ray: grid expansion, resource requests and queueing,
failures as rows, resume, and the merged markdown + JSON report."""

import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from reclora_ray.cluster.sweep import (
    DEFAULT_EXPERIMENT,
    Experiment,
    SweepSpec,
    _fingerprint,
    _finished,
    expand,
    parse_grid_arg,
    run_sweep,
    shared_stages,
)
from reclora_ray.config import ConfigError, load_config
from reclora_ray.rundir import MARKER
from reclora_ray.variants import get_variant
from tests.conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
# A top-level `tests` package installed by some dependency shadows this repo's tests/, so the
# experiment module is imported from its own directory.
EXPERIMENT = "sweep_experiments:fit"


def load_job(name):
    if str(REPO / "jobs") not in sys.path:  # a job script imports jobs/_bootstrap.py by its bare name
        sys.path.insert(0, str(REPO / "jobs"))
    spec = importlib.util.spec_from_file_location(f"job_{name}", REPO / "jobs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def max_overlap(rows):
    events = sorted([(r["metrics"]["start"], 1) for r in rows] + [(r["metrics"]["end"], -1) for r in rows])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


@pytest.fixture(scope="module")
def local_ray():
    path = f"{HERE}:{REPO}"
    # In the raylet's environment too, so the workers of another driver on this Ray (the killed
    # one below) import the experiments as well.
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = path
    try:
        ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    finally:
        os.environ.pop("PYTHONPATH") if saved is None else os.environ.update(PYTHONPATH=saved)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def importable_experiments(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def test_grid_args_and_expansion():
    assert parse_grid_arg("lora.n_meta=1,2,4") == ("lora.n_meta", [1, 2, 4])
    assert parse_grid_arg("lora.target_modules=[[q_proj],[q_proj,v_proj]]") == (
        "lora.target_modules",
        [["q_proj"], ["q_proj", "v_proj"]],
    )
    with pytest.raises(ConfigError, match="KEY=V1,V2"):
        parse_grid_arg("lora.n_meta")
    spec = SweepSpec(
        config="tiny",
        variants={"full": {}, "w/o long": {"retrieve.long_mode": "recent"}},
        grid={"lora.n_meta": [1, 4], "crm.lr": [1e-3]},
    )
    exps = expand(spec)
    assert [e.name for e in exps] == [
        "full,n_meta=1,lr=0.0010",
        "full,n_meta=4,lr=0.0010",
        "w/o long,n_meta=1,lr=0.0010",
        "w/o long,n_meta=4,lr=0.0010",
    ]
    assert exps[3].dirname == "w_o_long,n_meta=4,lr=0.0010"
    assert exps[3].cfg.retrieve.long_mode == "recent" and exps[3].cfg.lora.n_meta == 4
    assert exps[0].cfg.retrieve.long_mode == "semantic"


def test_random_search_draws_validated_points_with_tunes_samplers():
    spec = SweepSpec(
        config="tiny",
        search="random",
        num_samples=4,
        seed=3,
        grid={"crm.lr": {"loguniform": [1e-4, 1e-2]}, "lora.n_meta": [1, 2, 4]},
    )
    exps = expand(spec)
    assert [e.name.split(",")[0] for e in exps] == ["s0", "s1", "s2", "s3"]
    assert all(1e-4 <= e.cfg.crm.lr <= 1e-2 and e.cfg.lora.n_meta in (1, 2, 4) for e in exps)
    assert len({e.cfg.crm.lr for e in exps}) == 4
    assert [e.name for e in expand(spec)] == [e.name for e in exps]  # the seed fixes the draw: resumable
    with pytest.raises(ConfigError, match="ranges need search: random"):
        expand(SweepSpec(config="tiny", grid={"crm.lr": {"uniform": [0.1, 0.2]}}))
    with pytest.raises(ConfigError, match="needs num_samples"):
        expand(SweepSpec(config="tiny", search="random", grid={"crm.lr": [0.1]}))
    with pytest.raises(ConfigError, match="a list of values or one of"):
        expand(SweepSpec(config="tiny", search="random", num_samples=1, grid={"crm.lr": {"normal": [0, 1]}}))


def test_a_finished_row_is_reused_only_for_the_same_experiment_function_and_tuned_variants(tmp_path):
    reclora = expand(SweepSpec(config="tiny", variants={"a": {"tune.variants": ["reclora"]}}))[0]
    row = {"name": "a", "fingerprint": _fingerprint(reclora.cfg, DEFAULT_EXPERIMENT), "status": "succeeded"}
    (tmp_path / reclora.dirname).mkdir()
    (tmp_path / reclora.dirname / "experiment.json").write_text(json.dumps(row))
    assert _finished(reclora, str(tmp_path), DEFAULT_EXPERIMENT) == row
    assert _finished(reclora, str(tmp_path), "reclora_ray.pipeline:run_tuning") is None
    tallrec = expand(SweepSpec(config="tiny", variants={"a": {"tune.variants": ["tallrec"]}}))[0]
    assert tallrec.cfg.section_hash("tune") == reclora.cfg.section_hash("tune")  # variants: execution-only
    assert _finished(tallrec, str(tmp_path), DEFAULT_EXPERIMENT) is None


def test_bad_grid_key_fails_before_anything_runs():
    with pytest.raises(ConfigError, match=r"experiment n_mta=2: lora\.n_mta: unknown key"):
        expand(SweepSpec(config="tiny", grid={"lora.n_mta": [2]}))


@pytest.mark.parametrize("name", ["table3", "n_meta"])
def test_packaged_sweeps_expand_on_the_paper_configs(name):
    spec = SweepSpec.from_yaml(str(REPO / "cluster" / "sweeps" / f"{name}.yaml"))
    spec.config = "ml-1m"
    exps = expand(spec)
    tuned = sorted(v for e in exps for v in e.cfg.tune.variants)
    if name == "table3":
        assert tuned == sorted(
            [
                "reclora",
                "wo-meta-lora",
                "wo-meta-lora-same-params",
                "wo-long-retriever",
                "wo-short-retriever",
                "wo-both-retrievers",
            ]
        )
    else:
        assert tuned == ["reclora"] * 5 and [e.cfg.lora.n_meta for e in exps] == [1, 2, 4, 8, 16]
    assert all(get_variant(v) for v in tuned)
    # One leader of the data side; the CRM is shared by every experiment whose gates read the same CRMs
    # (table3's wo-long- and wo-both-retrievers read the recent history: their own sim-recent).
    assert len({e.upstream_key[:3] for e in exps}) == 1
    assert len({e.stage_key("pretrain-crm") for e in exps}) == (2 if name == "table3" else 1)


@pytest.mark.ray
def test_experiments_queue_on_their_resources_and_merge(local_ray, tmp_path):
    spec = SweepSpec(
        config="tiny", grid={"crm.lr": [0.05, 0.2, 0.5, 1.0]}, experiment=EXPERIMENT, resources={"num_cpus": 1}
    )
    rows = run_sweep(spec, str(tmp_path))
    assert [r["status"] for r in rows] == ["succeeded"] * 4
    assert [r["metrics"]["lr"] for r in rows] == [0.05, 0.2, 0.5, 1.0]
    assert all(r["metrics"]["cpus"] == 1.0 for r in rows)
    assert max_overlap(rows) <= 2  # 2 CPUs, 1 CPU each: the other two waited
    assert rows[-1]["metrics"]["logloss"] < rows[0]["metrics"]["logloss"]  # more steps of size lr

    table = (tmp_path / "sweep.md").read_text().splitlines()
    assert table[0] == "| experiment | crm.lr | auc | cpus | end | logloss | lr | pid | start | status | seconds |"
    assert len(table) == 2 + 4 + 2 and table[2].startswith("| lr=0.0500 | 0.0500 | ")
    assert table[-1] == "![Test AUC of each experiment](sweep.png)"  # the experiments' own AUC against crm.lr
    assert (tmp_path / "sweep.png").stat().st_size > 0
    assert json.loads((tmp_path / "sweep.json").read_text()) == rows
    assert json.loads((tmp_path / "lr=0.0500" / "metrics.json").read_text())["auc"] == rows[0]["metrics"]["auc"]

    # Two CPUs per experiment on a 2-CPU Ray: they run one at a time.
    wide = run_sweep(
        SweepSpec(config="tiny", grid={"crm.lr": [0.1, 0.3]}, experiment=EXPERIMENT, resources={"num_cpus": 2}),
        str(tmp_path / "wide"),
    )
    assert max_overlap(wide) == 1 and all(r["metrics"]["cpus"] == 2.0 for r in wide)


@pytest.mark.ray
def test_failures_are_rows_and_reruns_skip_finished_work(local_ray, tmp_path):
    job = load_job("sweep")
    argv = [
        "--config",
        "tiny",
        "--out",
        str(tmp_path),
        "--experiment",
        EXPERIMENT,
        "--grid",
        "crm.lr=0.1,50",
        "--max-concurrent",
        "1",
    ]
    assert job.main(argv) == 1
    first = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["status"] for r in first] == ["succeeded", "failed"]
    assert first[1]["error"] == "ValueError: crm.lr 50.0 diverges"
    assert "failed: ValueError: crm.lr 50.0 diverges" in (tmp_path / "sweep.md").read_text()

    assert job.main(argv) == 1  # the finished experiment is reused, the failed one retried
    second = json.loads((tmp_path / "sweep.json").read_text())
    assert second[0] == first[0]
    assert second[1]["started_at"] > first[1]["started_at"]

    # Another config for the same name is not taken for finished work.
    assert job.main(argv[:-4] + ["--grid", "crm.lr=0.1", "--set", "crm.epochs=2"]) == 0
    third = json.loads((tmp_path / "sweep.json").read_text())
    assert third[0]["started_at"] > first[0]["started_at"]


@pytest.mark.ray
def test_the_default_experiment_runs_the_real_pipeline_for_each_grid_point(local_ray, tmp_path):
    """The N_m sweep as users run it, on the tiny config: the leader runs every stage; the other
    grid point takes its data, embeddings, retrieval and CRM and only tunes and scores. The
    pipeline's own trainers and Ray Data stages run inside the experiment's task."""
    job = load_job("sweep")
    overrides = [*TINY_OVERRIDES, "tune.variants=[reclora]"]
    argv = [
        "--config",
        "tiny",
        "--out",
        str(tmp_path),
        "--grid",
        "lora.n_meta=1,2",
        "--max-concurrent",
        "1",
        *(arg for o in overrides for arg in ("--set", o)),
    ]
    assert job.main(argv) == 0
    rows = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["name"] for r in rows] == ["n_meta=1", "n_meta=2"]
    assert [r["status"] for r in rows] == ["succeeded", "succeeded"]
    assert rows[0]["shared"] == {}
    assert rows[1]["shared"] == dict.fromkeys(shared_stages(), "n_meta=1")
    for row in rows:
        for model in ("crm-sim", "zero-shot", "reclora"):
            assert 0 <= row["metrics"][f"{model}.auc"] <= 1 and row["metrics"][f"{model}.logloss"] > 0
    # The shared CRM scores the same test split identically; the adapters differ by N_m.
    assert rows[1]["metrics"]["crm-sim.auc"] == rows[0]["metrics"]["crm-sim.auc"]
    for row in rows:
        adapter = json.loads((tmp_path / row["name"] / "adapter" / "reclora" / "reclora_adapter.json").read_text())
        assert adapter["lora"]["n_meta"] == row["overrides"]["lora.n_meta"]
    assert (tmp_path / "n_meta=2" / "crm" / "sim").is_symlink()
    assert "| n_meta=2 | 2 |" in (tmp_path / "sweep.md").read_text()


@pytest.mark.ray
def test_a_killed_driver_resumes_with_tuner_restore(local_ray, tmp_path, caplog):
    """SIGKILL the sweep's driver (a second driver on the test's Ray) once the first trial has
    finished; the same command restores the Tune experiment, keeps the finished trial and runs
    the interrupted one."""
    argv = [
        "--config",
        "tiny",
        "--out",
        str(tmp_path),
        "--experiment",
        "sweep_experiments:slow",
        "--grid",
        "crm.epochs=1,12",
        "--max-concurrent",
        "1",
    ]
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, PYTHONPATH=f"{HERE}:{REPO}")
    output = tmp_path.parent / "killed-driver.log"
    with output.open("w") as sink:
        driver = subprocess.Popen(
            [sys.executable, str(REPO / "jobs" / "sweep.py"), *argv], env=env, stdout=sink, stderr=subprocess.STDOUT
        )
    first, second = tmp_path / "epochs=1" / "experiment.json", tmp_path / "epochs=12"
    started = tmp_path / "epochs=12.started"
    deadline = time.time() + 120
    while not (first.exists() and started.exists()) and time.time() < deadline and driver.poll() is None:
        time.sleep(0.5)
    driver.kill()
    driver.wait()
    assert first.exists(), output.read_text()[-3000:]
    assert not (second / "experiment.json").exists() and not (tmp_path / "sweep.json").exists()
    finished = json.loads(first.read_text())

    caplog.set_level(logging.INFO, logger="reclora_ray.cluster.sweep")
    job = load_job("sweep")
    assert job.main(argv) == 0
    assert caplog.text.count("resuming the Tune experiment") == 2  # both waves: the data leader's, then the rest
    rows = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["status"] for r in rows] == ["succeeded", "succeeded"]
    assert rows[0] == finished  # the finished trial was kept, not run again
    assert (
        rows[1]["started_at"] > finished["started_at"] and rows[1]["metrics"]["end"] - rows[1]["metrics"]["start"] >= 12
    )
    assert len(started.read_text().split()) == 2  # interrupted once, then run to the end


def ran(rows):
    return {r["name"]: r["metrics"]["ran"] for r in rows}


@pytest.mark.ray
def test_leaders_compute_upstream_stages_once_and_the_rest_reuse_them(local_ray, tmp_path):
    spec = SweepSpec(
        config="tiny",
        experiment="sweep_experiments:upstream_stages",
        max_concurrent=1,
        variants={"base": {}, "lr": {"crm.lr": 0.5}},
        grid={"lora.n_meta": [1, 4]},
    )
    rows = run_sweep(spec, str(tmp_path))
    assert ran(rows) == {
        "base,n_meta=1": "prepare embed retrieve pretrain-crm",
        "base,n_meta=4": "-",
        "lr,n_meta=1": "pretrain-crm",  # a leader too (its own CRM); the data side comes from base
        "lr,n_meta=4": "-",
    }
    assert rows[3]["shared"] == {
        "prepare": "base,n_meta=1",
        "embed": "base,n_meta=1",
        "retrieve": "base,n_meta=1",
        "pretrain-crm": "lr,n_meta=1",
    }
    assert rows[3]["metrics"]["plora.n_meta"] == 4  # run_pipeline-style nested results, flattened
    base, follower = tmp_path / "base,n_meta=1", tmp_path / "lr,n_meta=4"
    assert (follower / "crm" / "sim").resolve() == (tmp_path / "lr,n_meta=1" / "crm" / "sim").resolve()
    assert (follower / "data" / "part-0.bin").resolve() == base / "data" / "part-0.bin"
    # Retrieval is an output of its own (OUT/retrieval): shared as a whole, never inside the data.
    assert (follower / "retrieval").resolve() == base / "retrieval"
    assert not (follower / "crm").is_symlink()

    alone = run_sweep(
        SweepSpec(
            config="tiny",
            experiment="sweep_experiments:upstream_stages",
            grid={"lora.n_meta": [1, 4]},
            share_upstream=False,
        ),
        str(tmp_path / "alone"),
    )
    assert set(ran(alone).values()) == {"prepare embed retrieve pretrain-crm"}


@pytest.mark.ray
def test_sweep_at_a_uri_copies_shared_outputs_and_uploads_each_experiment(local_ray, tmp_path):
    spec = SweepSpec(config="tiny", experiment="sweep_experiments:upstream_stages", grid={"lora.n_meta": [1, 4]})
    rows = run_sweep(spec, f"file://{tmp_path}")
    assert ran(rows) == {"n_meta=1": "prepare embed retrieve pretrain-crm", "n_meta=4": "-"}
    follower = tmp_path / "n_meta=4"
    for part in ("data", "embeddings", "retrieval", "crm/sim"):
        assert not (follower / part).is_symlink() and (follower / part / MARKER).is_file()
        assert (follower / part / "part-0.bin").read_bytes() == (
            tmp_path / "n_meta=1" / part / "part-0.bin"
        ).read_bytes()
    assert json.loads((follower / "experiment.json").read_text())["status"] == "succeeded"
    assert not list(tmp_path.rglob(".*tmp*"))  # nothing half-written left at the URI
    assert run_sweep(spec, f"file://{tmp_path}") == rows  # finished experiments are reused


def test_shared_stage_keys_follow_the_stage_table_recipe():
    """A stage is shared exactly when the config values it depends on agree, its own and its
    upstream stages': execution-only fields and what only tuning or scoring reads never split it."""
    base = Experiment("base", {}, load_config("tiny"))

    def changed(change: str) -> set[str]:
        other = Experiment(change, {}, load_config("tiny", [change]))
        return {stage for stage in shared_stages() if other.stage_key(stage) != base.stage_key(stage)}

    everything = set(shared_stages())
    assert changed("run.seed=1") == everything
    assert changed("data.k_core=10") == everything
    assert changed("embed.pca_dim=8") == {"embed", "retrieve", "pretrain-crm"}
    assert changed("llm.model=smollm2-packaged") == {"embed", "retrieve", "pretrain-crm"}
    assert changed("retrieve.k_long=7") == {"retrieve", "pretrain-crm"}
    assert changed("retrieve.long_mode=recent") == {"retrieve", "pretrain-crm"}
    assert changed("crm.lr=0.5") == changed("crm.dropout=0.3") == {"pretrain-crm"}
    # which history a CRM reads is the variants' (crm.history only picks `reclora pretrain-crm`'s)
    assert changed("crm.history=recent") == set()
    # execution-only fields, prompt-only LLM settings and what only tuning or scoring reads
    for change in (
        "data.blocks=4",
        "run.num_cpus=1",
        "embed.batch_size=3",
        "retrieve.concurrency=1",
        "retrieve.batch_size=7",
        "crm.max_failures=0",
        "llm.max_length=99",
        "llm.chat_template=false",
        "lora.n_meta=2",
        "tune.lr=0.1",
        "score.batch_size=3",
    ):
        assert changed(change) == set(), change
