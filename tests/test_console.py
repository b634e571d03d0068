"""The console: which forwarded worker lines are shown, stage lines, one-line progress."""

import logging
import os
import sys
import time

import pytest

from reclora_ray.console import (
    VERBOSE_ENV,
    Progress,
    RepeatedLines,
    setup_logging,
    stage_line,
    worker_lines_to_show,
)


def test_forwarded_worker_output_keeps_ours_warnings_and_tracebacks_only():
    ours = "06:31:20 INFO reclora_ray.crm.train: epoch 0: train loss 0.6000, valid AUC 0.7000 (best), 900 samples/s"
    lines = [
        "2026-12-02 06:31:20,286\tINFO tune.py:1007 -- Wrote the latest version of all result files",
        "Requesting resources: {'CPU': 1.0} * 1",
        "Moving model to device: cpu",
        ours,
        "2026-12-02 06:31:20,286\tWARNING worker.py:1 -- A worker died or was killed while executing a task",
        "RayDeprecationWarning: `ExecutionOptions.exclude_resources` is deprecated and will be removed",
        "Traceback (most recent call last):",
        '  File "x.py", line 1, in f',
        "    raise ValueError('crm.lr must be positive')",
        "ValueError: crm.lr must be positive",
        "Loading weights: 100%|##########| 21/21",
        "[2026-12-02 07:24:21,622 E 12145 12145] (gcs_server) gcs_actor_scheduler.cc:538: Failed to kill actor d7f4, "
        "return status: Invalid: KillActor RPC failed for actor d7f4: RpcError: RPC error: Socket closed",
    ]
    assert worker_lines_to_show(lines, "RayTrainWorker") == [ours, lines[4], *lines[6:10]]
    assert (
        worker_lines_to_show(["Traceback (most recent call last):", "ConnectionError: x"], "PlacementGroupCleaner")
        == []
    )  # its monitor failing does not fail the run


def test_stage_lines_say_how_long_and_how_it_ended(caplog):
    log = logging.getLogger("reclora_ray.test")
    caplog.set_level(logging.INFO)
    with stage_line(log, "embed"):
        pass
    with pytest.raises(KeyError), stage_line(log, "tune reclora"):
        raise KeyError("x")
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "==> embed" and lines[1].startswith("<== embed: done in ")
    assert lines[2] == "==> tune reclora" and lines[3].startswith("<== tune reclora: FAILED after ")
    assert lines[3].endswith(" s (KeyError)")


def test_progress_lines_carry_rate_eta_and_extras(caplog):
    log = logging.getLogger("reclora_ray.test")
    caplog.set_level(logging.INFO)
    progress = Progress(log, "epoch 0", total=5, every_s=0.0)
    progress.update(1)  # the first step (after a data pipeline's warm-up) starts the rate's clock
    time.sleep(0.01)
    progress.update(3, loss=0.5, lr=2e-5)
    progress.close()
    first, second, last = (r.getMessage() for r in caplog.records)
    assert first.startswith("epoch 0: 1/5 steps (20%), ") and first.endswith(" s") and "ETA" not in first
    assert second.startswith("epoch 0: 4/5 steps (80%), ") and " steps/s, ETA " in second
    assert second.endswith("loss 0.5000, lr 2.00e-05")  # a small learning rate keeps its digits
    assert last.startswith("epoch 0: 4/5 steps (80%)")
    caplog.clear()
    quiet = Progress(log, "epoch 0", total=10, every_s=3600.0)  # rate-limited: nothing until the end
    quiet.update(3)
    assert not caplog.records
    quiet.close()
    assert len(caplog.records) == 1
    Progress(log, "rank 1", total=10, every_s=0.0, active=False).update(5)
    assert len(caplog.records) == 1
    caplog.clear()
    whole = Progress(log, "epoch 1", total=2, every_s=0.0)
    whole.update(1)
    whole.update(1, loss=0.4)  # the last unit: close() says it, once
    whole.close(loss=0.5)
    assert [r.getMessage().split(", ")[0] for r in caplog.records] == [
        "epoch 1: 1/2 steps (50%)",
        "epoch 1: 2/2 steps (100%)",
    ]
    assert caplog.records[-1].getMessage().endswith("loss 0.5000")
    caplog.clear()
    long = Progress(log, "epoch 2", total=1000, every_s=0.0)
    for _ in range(1000):
        long.update(1)
    long.close()
    # a line per fifth (20%, 40%, 60%, 80%) and the end's: not 1,000
    assert [r.getMessage().split(" ")[2] for r in caplog.records] == [f"{n}/1000" for n in range(200, 1001, 200)]
    caplog.clear()
    blocks = Progress(log, "test", total=10_000, unit="samples", every_s=3600.0)
    time.sleep(0.05)  # the wait for the first block, which holds most of the split
    blocks.update(9_900)
    blocks.update(100)
    blocks.close()
    rate = caplog.records[-1].getMessage().split(", ")[1]  # the whole wall, not the last block's instant
    assert rate.endswith(" samples/s") and float(rate.split()[0].replace(",", "")) < 10_000 / 0.05


def test_a_line_every_worker_prints_is_shown_once_and_warnings_always():
    loaded = "INFO reclora_ray.base_model: loaded smollm2-packaged (/cache/smollm2, float32 (llm.dtype auto)) on cpu"
    warning = "WARNING reclora_ray.llm.collate: 1 prompt(s) longer than 510 tokens were cut from the left"
    repeats = RepeatedLines(window_s=3600)
    assert repeats.first_time([f"01:25:25 {loaded}", f"01:25:25 {warning}"]) == [
        f"01:25:25 {loaded}",
        f"01:25:25 {warning}",
    ]
    # the second worker, a few seconds later: the same line is dropped, the warning shown
    assert repeats.first_time([f"01:25:27 {loaded}", f"01:25:27 {warning}", "Traceback (most recent call last):"]) == [
        f"01:25:27 {warning}",
        "Traceback (most recent call last):",
    ]
    progress = "01:25:28 INFO reclora_ray.llm.tune: epoch 0: 4/16 micro-batches"
    assert repeats.first_time([progress]) == [progress]  # another line of ours: shown
    later = RepeatedLines(window_s=0.0)  # past the window the line is news again (the next stage's load)
    assert later.first_time([f"01:25:25 {loaded}"]) == [f"01:25:25 {loaded}"]
    assert later.first_time([f"01:29:45 {loaded}"]) == [f"01:29:45 {loaded}"]


def test_a_console_that_is_not_a_terminal_gets_no_colour_escapes_nor_matplotlib_info(monkeypatch):
    for name in ("RAY_COLOR_PREFIX", "RAY_AIR_NEW_OUTPUT", VERBOSE_ENV):  # restored after the test
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    monkeypatch.setattr(logging.getLogger("matplotlib"), "level", logging.NOTSET)
    setup_logging()
    assert os.environ["RAY_COLOR_PREFIX"] == "0"  # Ray prints "(RayTrainWorker pid=1)" without ANSI codes
    assert logging.getLogger("matplotlib").getEffectiveLevel() == logging.WARNING  # its INFO lines are not ours
