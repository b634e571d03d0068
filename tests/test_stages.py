"""The stage table is the one place a stage is declared: a toy stage added there alone shows up in
the CLI, in `reclora run`, in the Ray Job script and in the sweep's upstream sharing."""

import json
import runpy
import sys
from pathlib import Path

import pytest

from reclora_ray import cli, pipeline, stages
from reclora_ray.cluster.sweep import Experiment, plan_waves, share_stage, shared_stages
from reclora_ray.config import load_config
from reclora_ray.rundir import MARKER, RunDir, StageOutputExists, read_marker
from reclora_ray.stages import Stage, StageRun

REPO = Path(__file__).resolve().parents[1]


# The toy stages' run functions: what a new stage module holds.
def count_stage(cfg, run, key, overwrite):
    """toy-count: the numbers 0..n-1, n from the seed."""
    stage = StageRun("toy-count", cfg, run)
    if stage.up_to_date(overwrite):
        return stage.out
    with stage.write() as tmp:
        (tmp / "numbers.json").write_text(json.dumps(list(range(3 + cfg.run.seed % 5))))
    return stage.out


def sum_stage(cfg, run, key, overwrite):
    """toy-sum: the sum of toy-count's numbers."""
    stage = StageRun("toy-sum", cfg, run)
    if stage.up_to_date(overwrite):
        return stage.out
    numbers = json.loads((run.root / "toy-count" / "numbers.json").read_text())
    with stage.write() as tmp:
        (tmp / "sum.json").write_text(json.dumps(sum(numbers)))
    return stage.out


TOYS = [
    Stage(
        "toy-count",
        "count to a number the seed picks",
        f"{__name__}:count_stage",
        part="toy-count",
        sections=("run.seed",),
        shared=True,
    ),
    Stage(
        "toy-sum",
        "sum what toy-count counted",
        f"{__name__}:sum_stage",
        part="toy-sum",
        inputs=("toy-count",),
        shared=True,
    ),
]


@pytest.fixture
def with_toys(monkeypatch):
    """The real table with the two toy entries added after retrieve: nothing else is touched."""
    table = {}
    for name, stage in stages.STAGES.items():
        table[name] = stage
        if name == "retrieve":
            table.update({t.name: t for t in TOYS})
    monkeypatch.setattr(stages, "STAGES", table)


def test_a_toy_stage_in_the_table_is_a_cli_command_with_the_stage_protocol(with_toys, tmp_path, capsys):
    assert "toy-sum" in cli.commands() and cli.uri_inputs("toy-sum") == ["toy-count"]
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "toy-sum" in capsys.readouterr().out
    out = str(tmp_path / "run")
    # An input that is not there yet names the command that writes it.
    assert cli.main(["toy-sum", "--config", "tiny", "--out", out]) == 2
    assert cli.main(["toy-count", "--config", "tiny", "--set", "run.seed=3", "--out", out]) == 0
    assert cli.main(["toy-sum", "--config", "tiny", "--set", "run.seed=3", "--out", out]) == 0
    run = RunDir(out)
    assert json.loads((run.root / "toy-sum" / "sum.json").read_text()) == 0 + 1 + 2 + 3 + 4 + 5
    assert (run.root / "toy-sum" / "config.yaml").is_file()
    identity = read_marker(run.root / "toy-sum")["identity"]

    # Same config: a no-op. An execution-only change (run.num_cpus) too.
    cfg = load_config("tiny", ["run.seed=3", "run.num_cpus=1"])
    assert stages.execute("toy-sum", cfg, out) == run.root / "toy-sum"
    assert read_marker(run.root / "toy-sum")["identity"] == identity
    # The upstream written again (same config): what was built on it is stale and refuses.
    stages.execute("toy-count", cfg, out, overwrite=True)
    with pytest.raises(StageOutputExists, match="toy-sum was written by a different config"):
        stages.execute("toy-sum", cfg, out)


def test_reclora_run_follows_the_table(monkeypatch, tmp_path):
    """`reclora run` is the task's stages in table order: with a table of the two toys, it runs them."""
    monkeypatch.setattr(stages, "STAGES", {t.name: t for t in TOYS})
    out = tmp_path / "run"
    assert cli.main(["run", "--config", "tiny", "--out", str(out)]) == 0
    assert json.loads((out / "toy-sum" / "sum.json").read_text()) == sum(range(3 + 42 % 5))
    assert (out / "config.yaml").is_file()
    stamp = (out / "toy-sum" / MARKER).stat().st_mtime_ns
    pipeline.run_task(load_config("tiny"), out)  # done: skipped
    assert (out / "toy-sum" / MARKER).stat().st_mtime_ns == stamp


def test_the_job_script_runs_any_stage_of_the_table(with_toys, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "jobs"))
    out = tmp_path / "run"
    for command in ("toy-count", "toy-sum"):
        monkeypatch.setattr(sys, "argv", ["jobs/stage.py", command, "--config", "tiny", "--out", str(out)])
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(REPO / "jobs" / "stage.py"), run_name="__main__")
        assert exit_.value.code == 0
    assert (out / "toy-sum" / "sum.json").is_file()


def test_the_sweep_shares_a_shared_toy_stage_by_its_key(with_toys, tmp_path):
    assert {"toy-count", "toy-sum"} <= set(shared_stages())
    a, b, c = (
        Experiment(n, {}, load_config("tiny", o))
        for n, o in (("a", ["lora.n_meta=1"]), ("b", ["lora.n_meta=2"]), ("c", ["run.seed=1"]))
    )
    assert a.stage_key("toy-sum") == b.stage_key("toy-sum") != c.stage_key("toy-sum")
    assert [[e.name for e in wave] for wave in plan_waves([a, b, c])] == [["a", "c"], ["b"]]

    donor, follower = tmp_path / "a", tmp_path / "b"
    stages.execute("toy-count", a.cfg, donor)
    stages.execute("toy-sum", a.cfg, donor)
    for stage in ("toy-count", "toy-sum"):
        share_stage(str(donor), follower, stage, b.cfg)
    assert (follower / "toy-sum").is_symlink() and (follower / "toy-sum").resolve() == donor / "toy-sum"
    stamp = (donor / "toy-sum" / MARKER).stat().st_mtime_ns
    stages.execute("toy-sum", b.cfg, follower)  # the follower's run skips the shared output
    assert (donor / "toy-sum" / MARKER).stat().st_mtime_ns == stamp


def test_outputs_written_before_the_recipe_carry_over_when_their_config_still_matches(with_toys, tmp_path):
    """A marker from before fingerprint recipe 2 (no "recipe"; another own hash, the same inputs
    hash) is carried over when the config saved beside the output gives this run's own fingerprint,
    keeping its identity; another config is refused with what to do."""
    out = RunDir(tmp_path / "run")
    cfg = load_config("tiny", ["run.seed=3"])
    stages.execute("toy-count", cfg, out)
    stages.execute("toy-sum", cfg, out)
    for name in ("toy-count", "toy-sum"):  # as an older reclora wrote them
        marker = read_marker(out.root / name)
        old = {
            "fingerprint": "0ld0ld0ld0ld0ld0." + marker["fingerprint"].rsplit(".", 1)[1],
            "identity": marker["identity"],
            "finished_at": marker["finished_at"],
        }
        (out.root / name / MARKER).write_text(json.dumps(old))
    identity = read_marker(out.root / "toy-sum")["identity"]
    stages.execute("toy-sum", cfg, out)  # carried over, not rewritten
    marker = read_marker(out.root / "toy-sum")
    assert marker["identity"] == identity and marker["recipe"] == 2 and marker["carried_over_from"].startswith("0ld")
    assert marker["fingerprint"] == StageRun("toy-sum", cfg, out).fingerprint
    with pytest.raises(StageOutputExists, match="older reclora .* pass --overwrite .*or delete"):
        stages.execute("toy-count", load_config("tiny", ["run.seed=4"]), out)


def test_a_run_directory_with_retrieval_inside_the_data_is_moved_to_the_new_layout(tmp_path):
    from reclora_ray.rundir import staged_output

    run = RunDir(tmp_path / "run")
    with staged_output(run.legacy_retrieval, "fp") as tmp:
        (tmp / "retrieval.json").write_text("{}")
    identity = read_marker(run.legacy_retrieval)["identity"]
    StageRun("prepare", load_config("tiny"), run)  # any stage instance brings the layout up to date
    assert not run.legacy_retrieval.exists() and read_marker(run.retrieval)["identity"] == identity


def test_the_architecture_document_shows_the_stage_table_as_it_is():
    assert stages.markdown_table() in (REPO / "docs" / "architecture.md").read_text()
