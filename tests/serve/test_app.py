"""Deployment options, the `serve run` builder and the serve config checks (no Ray started)."""

import pytest

from reclora_ray.cli import main as cli_main
from reclora_ray.config import ConfigError, load_config
from reclora_ray.serve.app import build_app, deployment_options
from reclora_ray.serve.requests import ScoreRequest, describe


def test_fixed_replicas_or_autoscaling_from_config():
    fixed = deployment_options(load_config("tiny", ["serve.num_replicas=3", "serve.num_gpus=0.5"]))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.5}
    scaled = deployment_options(
        load_config("tiny", ["serve.min_replicas=1", "serve.max_replicas=4", "serve.target_ongoing_requests=16"])
    )
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 16.0}
    assert "num_replicas" not in scaled


@pytest.mark.parametrize(
    "override, words",
    [
        ("serve.max_replicas=0", "max_replicas"),
        ("serve.max_batch_size=0", "limits must be >= 1"),
        ("serve.batch_wait_timeout_s=-1", "batch_wait_timeout_s"),
        ("serve.forward_batch_size=0", "forward_batch_size"),
    ],
)
def test_bad_serve_config_is_refused(override, words):
    with pytest.raises(ConfigError, match=words):
        load_config("tiny", [override])


def test_build_app_names_its_arguments_and_checks_the_run(tmp_path):
    with pytest.raises(ValueError, match="run=<run dir>"):
        build_app({"config": "tiny"})
    with pytest.raises(ValueError, match="holds no prepared dataset"):
        build_app({"config": "tiny", "run": str(tmp_path), "overrides": "serve.port=9000;serve.max_batch_size=4"})


def test_cli_serve_without_a_run_dir_fails_cleanly(capsys):
    assert cli_main(["serve", "--config", "tiny"]) == 2


def test_validation_messages_name_the_field():
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        ScoreRequest.model_validate_json('{"user_id": 1, "candidates": [1, 2.5], "history": [{"item_id": 1}]}')
    assert describe(info.value) == (
        "history.0.rating: Field required; candidates.1: Value error, a catalogue id is an integer or a string"
    )


def test_a_port_in_use_is_one_line_naming_it(tmp_path, caplog):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        code = cli_main(["serve", "--config", "tiny", "--run", str(tmp_path), "--set", f"serve.port={port}"])
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == [f"serve.port: 127.0.0.1:{port} is already in use; pick another with --set serve.port=N"]


def test_load_shedding_options_reach_the_deployment():
    options = deployment_options(
        load_config("tiny", ["serve.max_queued_requests=7", "serve.retry_after_s=3", "serve.health_check_period_s=2"])
    )
    assert options["max_queued_requests"] == 7 and options["health_check_period_s"] == 2.0
    assert options["backpressure_config"] == {"status_code": 503, "retry_after_s": 3}
