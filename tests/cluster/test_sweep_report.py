"""The sweep's results for people: sweep.md's table and seed spread, sweep.png."""

from reclora_ray.cluster.sweep_report import markdown_table, plot_sweep, seed_summary


def test_markdown_table_lists_every_metric_and_escapes_pipes():
    rows = [
        {
            "name": "a",
            "overrides": {"x": 1},
            "metrics": {"auc": 0.5},
            "status": "succeeded",
            "error": None,
            "seconds": 1.0,
        },
        {
            "name": "b",
            "overrides": {"x": 2},
            "metrics": {"loss": 1.25},
            "status": "failed",
            "error": "E: a|b",
            "seconds": 2.0,
        },
    ]
    assert markdown_table(rows, ["x"]).splitlines() == [
        "| experiment | x | auc | loss | status | seconds |",
        "|---|---|---|---|---|---|",
        "| a | 1 | 0.5000 |  | succeeded | 1.0 |",
        "| b | 2 |  | 1.2500 | failed: E: a\\|b | 2.0 |",
    ]


def test_seed_summary_gives_the_spread_of_each_auc_over_the_seeds_of_one_setting():
    def row(seed, n_meta, auc, delta, status="succeeded"):
        return {
            "name": f"n_meta={n_meta},seed={seed}",
            "overrides": {"lora.n_meta": n_meta, "run.seed": seed},
            "metrics": {"reclora.auc": auc, "vs_reclora.crm-sim.delta_auc": delta, "reclora.logloss": 0.6},
            "status": status,
        }

    rows = [row(1, 8, 0.74, -0.01), row(2, 8, 0.76, 0.01), row(3, 8, 0.5, 0.2, "failed"), row(1, 16, 0.7, 0.0)]
    assert seed_summary(rows).splitlines()[3:] == [
        "| setting | metric | mean | sd | min | max | seeds |",
        "|---|---|---|---|---|---|---|",
        "| n_meta=8 | reclora.auc | 0.7500 | 0.0141 | 0.7400 | 0.7600 | 1, 2 |",
        "| n_meta=8 | vs_reclora.crm-sim.delta_auc | 0.0000 | 0.0141 | -0.0100 | 0.0100 | 1, 2 |",
    ]  # the failed seed and the single-seed setting left out; LogLoss is not an AUC
    assert seed_summary([row(1, 8, 0.74, 0.0)]) == ""


def test_sweep_plot_shows_validation_auc_per_experiment_and_skips_rows_without_one(tmp_path):
    def row(name, metrics, status="succeeded"):
        return {"name": name, "overrides": {}, "metrics": metrics, "status": status, "error": None, "seconds": 1.0}

    rows = [
        row("quickstart", {"valid.reclora.auc": 0.77, "valid.reclora.logloss": 0.57, "reclora.auc": 0.75}),
        row("tallrec", {"valid.tallrec.auc": 0.74}),
        row("broken", {}, status="failed"),
    ]
    assert plot_sweep(rows, [], tmp_path / "sweep.png") == "Validation AUC"
    assert (tmp_path / "sweep.png").stat().st_size > 0
    assert (
        plot_sweep([row("test only", {"reclora.auc": 0.75, "own_samples.crm-sim.auc": 0.7})], [], tmp_path / "t.png")
        == "Test AUC"
    )
    # No finite AUC: nothing drawn (a NaN one, when no validation sample was positive, included).
    assert (
        plot_sweep(
            [row("no auc", {"loss": 1.0}), row("nan", {"valid.reclora.auc": float("nan")})], [], tmp_path / "none.png"
        )
        is None
    )
    assert not (tmp_path / "none.png").exists()
