"""iLoRA as a variant: rank-split experts on every projection, one gate fed by SASRec's R_c."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from reclora_ray.crm.checkpoint import save_crm
from reclora_ray.crm.features import build_features
from reclora_ray.crm.models import build_model as build_crm
from reclora_ray.crm.models.sasrec import SASRec
from reclora_ray.data.prepared import PreparedData
from reclora_ray.llm.inputs import InputBuilder
from reclora_ray.llm.model import build_model
from reclora_ray.llm.plora import PersonalizedLoRAModel, PLoRALinear, save_adapter
from reclora_ray.rundir import RunDir
from reclora_ray.variants import ILORA_TARGETS, crm_config, crm_name, get_variant
from tests.conftest import tiny_config
from tests.crm.conftest import write_prepared


@pytest.fixture(scope="module")
def ilora_run(tmp_path_factory):
    """A run dir of the CRM fixture data with an (untrained) SASRec checkpoint where iLoRA looks."""
    root = tmp_path_factory.mktemp("ilora")
    write_prepared(root, with_retrieval=False)
    cfg = tiny_config()
    variant = get_variant("ilora")
    crm_cfg = crm_config(cfg, variant)
    data = PreparedData.load(root / "data")
    spec, tables = build_features(data, crm_cfg, cfg.retrieve.k_long)
    torch.manual_seed(0)
    out = RunDir(root).crm(crm_name(cfg, variant))
    out.mkdir(parents=True)
    save_crm(build_crm(spec, crm_cfg, tables), out)
    return root, cfg, data


def test_ilora_is_four_rank_two_experts_with_sasrec_on_the_recent_sequence():
    cfg = tiny_config()
    variant = get_variant("ilora")
    lora = variant.lora_config(cfg.lora)
    assert (lora.variant, lora.n_meta, lora.r, lora.mixing, lora.gate) == ("plora", 4, 2, "paper", "shared")
    assert lora.alpha / lora.r == 32 / 8  # the paper's alpha / r of the whole rank-8 LoRA
    assert variant.tune_config(cfg.tune).lr == 8e-4 and get_variant("reclora").tune_config(cfg.tune) is cfg.tune
    assert (crm_config(cfg, variant).model, crm_name(cfg, variant)) == ("sasrec", "sasrec-recent")
    assert crm_config(cfg, get_variant("reclora")).model == cfg.crm.model  # other variants keep the config's


def _batch(cfg, data, variant, tokenizer, spec, n=4):
    rows = data.samples("train").query("pos >= 3").head(n).reset_index(drop=True)
    return InputBuilder(cfg, data, variant, tokenizer, spec).training_batch(rows)


def test_the_gate_reads_sasrec_and_only_experts_and_gate_train(ilora_run):
    root, cfg, data = ilora_run
    variant = get_variant("ilora")
    model, tokenizer, spec = build_model(cfg, RunDir(root), variant)
    assert isinstance(model.crm, SASRec)
    llm = model.llm
    assert isinstance(llm, PersonalizedLoRAModel)
    n_layers = llm.base_model.config.num_hidden_layers
    wrapped = llm.lora_layers()
    assert len(wrapped) == n_layers * len(ILORA_TARGETS)
    assert {name.rsplit(".", 1)[-1] for name in wrapped} == set(ILORA_TARGETS)

    batch = _batch(cfg, data, variant, tokenizer, spec)
    model.eval()  # no gate dropout
    r_c = model.crm.represent(batch["crm_features"])
    assert r_c.shape[1] == model.crm.d_c == llm.crm_dim
    torch.testing.assert_close(model.gate_weights(batch["crm_features"]), llm.gate(r_c))

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"llm.{n}" for n in llm.adapter_state_dict()}
    assert all(n.endswith(("lora_A", "lora_B")) or n.startswith("llm.gate.") for n in trainable)
    with torch.no_grad():  # B = 0 at init: give it values so that A and the gate get gradient
        for layer in wrapped.values():
            layer.lora_B.normal_(std=0.1)
    model.train()
    model(**batch).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == trainable and all(g.abs().sum() > 0 for g in grads.values())
    assert all(p.grad is None for p in model.crm.parameters())


def test_the_gate_may_read_the_crm_heads_last_hidden_layer_and_its_adapter_keeps_that(ilora_run, tmp_path):
    root, cfg, data = ilora_run
    ilora = get_variant("ilora")
    variant = dataclasses.replace(ilora, lora={**ilora.lora, "gate_input": "last_hidden"})
    model, tokenizer, spec = build_model(cfg, RunDir(root), variant)
    crm, llm = model.crm, model.llm
    assert llm.crm_dim == crm.cfg.mlp_hidden[-1] != crm.d_c
    features = _batch(cfg, data, variant, tokenizer, spec)["crm_features"]
    model.eval()
    hidden = crm.head.last_hidden(crm.represent(features))  # what the CRM's output Linear reads
    torch.testing.assert_close(crm.head[-1](hidden).squeeze(-1), crm(features))
    with torch.no_grad():
        for param in llm.gate.parameters():
            param.normal_(std=0.5)  # a gate that tells R_c's apart
    alpha = model.gate_weights(features)
    torch.testing.assert_close(alpha, llm.gate(hidden))
    assert not torch.allclose(alpha[0], alpha[1])

    save_adapter(llm, tmp_path / "adapter")
    loaded, _, _ = build_model(cfg, RunDir(root), ilora, adapter_dir=tmp_path / "adapter")
    assert loaded.gate_input == "last_hidden"  # the adapter's, not the config's default
    loaded.eval()
    torch.testing.assert_close(loaded.gate_weights(features), alpha)


def test_ilora_layer_equals_the_naive_sum_over_its_experts(make_llama):
    torch.manual_seed(0)
    llm = PersonalizedLoRAModel(make_llama(), get_variant("ilora").lora_config(tiny_config().lora), crm_dim=6)
    layer: PLoRALinear = llm.lora_layers()["model.layers.1.mlp.down_proj"]
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 5, layer.in_features)
    alpha = torch.softmax(torch.randn(3, 4), dim=-1)
    layer.alpha = alpha
    out = layer(x)
    layer.alpha = None
    experts = [(layer.lora_A[2 * k : 2 * k + 2], layer.lora_B[:, 2 * k : 2 * k + 2]) for k in range(4)]
    scaling = 32 / 8
    for i in range(3):
        expected = layer.base_layer(x[i]) + scaling * sum(
            alpha[i, k] * F.linear(F.linear(x[i], a), b) for k, (a, b) in enumerate(experts)
        )
        torch.testing.assert_close(out[i], expected, atol=1e-5, rtol=1e-5)
