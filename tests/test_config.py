import re

import pytest

from reclora_ray.config import PACKAGED_CONFIGS, ConfigError, load_config


@pytest.mark.parametrize("name", PACKAGED_CONFIGS)
def test_packaged_configs_load(name):
    cfg = load_config(name)
    assert cfg.retrieve.k_long > cfg.retrieve.k_short


def test_extends_and_override():
    tiny = load_config("tiny", ["crm.lr=3e-4", "lora.target_modules=[q_proj]"])
    assert tiny.data.dataset == "ml-100k"  # inherited from quickstart
    assert tiny.llm.model == "tiny-random"
    assert tiny.crm.lr == pytest.approx(3e-4)
    assert tiny.lora.target_modules == ["q_proj"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("crm.embed_dimm=3", "crm.embed_dimm: unknown key (did you mean crm.embed_dim?)"),
        ("crm.model=foo", "crm.model: 'foo' is not one of"),
        ("lora.r=x", "lora.r: expected an integer"),
        ("crm.use_gpu=1", "crm.use_gpu: expected true or false"),
        ("data.split=[0.5,0.5,0.5]", "data.split: three positive fractions"),
        ("nosuchsection.x=1", "nosuchsection: unknown key"),
        ("crm", "expected KEY=VALUE"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("tiny", [override])


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("crm:\n  epochs: 2\n  dropuot: 0.1\n")
    with pytest.raises(ConfigError, match=r"crm.dropuot: unknown key \(did you mean crm.dropout\?\)"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="unknown config 'nope'"):
        load_config("nope")
    cyc = tmp_path / "cyc.yaml"
    cyc.write_text(f"extends: {cyc}\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(cyc))


def test_section_hash_tracks_only_named_sections():
    a = load_config("tiny")
    b = load_config("tiny", ["crm.lr=0.5"])
    assert a.section_hash("data") == b.section_hash("data")
    assert a.section_hash("crm") != b.section_hash("crm")


def test_a_setting_added_later_keeps_older_fingerprints_while_at_its_default():
    cfg = load_config("tiny", ["lora.gate_input=head_input"])
    assert "gate_input" not in cfg.fingerprint_payload("lora")["lora"]  # as outputs from before it
    other = load_config("tiny", ["lora.gate_input=last_hidden"])
    assert other.fingerprint_payload("lora")["lora"]["gate_input"] == "last_hidden"
    assert other.section_hash("lora") != cfg.section_hash("lora")


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config("tiny", ["tune.few_shot=7"])
    path = tmp_path / "resolved.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(str(path)) == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("crm.lr=-1e-3", r"crm\.lr: must be > 0, got -0\.001"),
        ("tune.lr=0", r"tune\.lr: must be > 0"),
        ("tune.micro_batch=0", r"tune\.micro_batch: must be >= 1, got 0"),
        ("score.batch_size=0", r"score\.batch_size: must be >= 1"),
        ("embed.batch_size=-4", r"embed\.batch_size: must be >= 1"),
        ("serve.port=70000", r"serve\.port: must be a port in 1\.\.65535, got 70000"),
        ("serve.port=0", r"serve\.port: must be a port in 1\.\.65535"),
        ("tune.warmup_ratio=1.5", r"tune\.warmup_ratio: must be in \[0, 1\]"),
        ("lora.dropout=1", r"lora\.dropout: must be in \[0, 1\)"),
        ("crm.mlp_hidden=[64,0]", r"crm\.mlp_hidden\[1\]: must be >= 1, got 0"),
        ("crm.sim.heads=0", r"crm\.sim\.heads: must be >= 1"),
        ("data.rating_range=[5,1]", r"data\.rating_range: \[min, max\] with min <= max"),
        ("serve.max_queued_requests=0", r"serve\.max_queued_requests: must be >= 1 \(or -1: unbounded\)"),
        ("serve.request_timeout_s=0", r"serve\.request_timeout_s: must be > 0"),
        ("run.num_cpus=0", r"run\.num_cpus: must be >= 1"),
    ],
)
def test_numbers_out_of_range_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [override])


def test_range_limits_accept_the_edges():
    cfg = load_config(
        "tiny",
        [
            "serve.port=65535",
            "tune.warmup_ratio=1",
            "lora.dropout=0",
            "serve.max_queued_requests=-1",
            "crm.max_failures=-1",
            "serve.request_timeout_s=null",
            "data.rating_range=[1,1]",
        ],
    )
    assert cfg.serve.port == 65535 and cfg.serve.request_timeout_s is None
