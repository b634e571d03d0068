"""Does the text carry signal the CRM lacks? An upper bound for RecLoRA at this model size.

A two-feature logistic regression on the CRM's logit and a plain-LoRA variant's logit
(logit P(yes)), fit on the validation samples tuning selected its epoch on (the same
`tune.valid_subsample`, seed `run.seed`), then scored on the test samples every LLM row of the
report was scored on. If even this blend does not beat the CRM on test, the LLM's text adds
nothing the CRM lacks here; if it does, a personalized LoRA reading R_c should reach it.

The CRM and each variant are scored on the validation samples here (one Scorer each, in this
process); the test predictions are the run's own (OUT/scores). Needs a finished `reclora run`.

    python bench/blend_upper_bound.py --run runs/quickstart [--variants rella tallrec]

Last line: one JSON object {variant: {"valid": {...}, "test": {"crm", "llm", "blend", "blend_minus_crm"}}}.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reclora_ray.config import load_config  # noqa: E402
from reclora_ray.llm.histories import fixed_subsample, load_samples  # noqa: E402
from reclora_ray.llm.score import CRMScorer, Scorer  # noqa: E402
from reclora_ray.metrics import binary_metrics, bootstrap_metrics, interval, paired_p_value  # noqa: E402
from reclora_ray.predictions import read_predictions  # noqa: E402
from reclora_ray.rundir import RunDir  # noqa: E402
from reclora_ray.variants import crm_name, get_variant  # noqa: E402

log = logging.getLogger("blend")


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.log(p) - np.log1p(-p)


def fit_blend(crm_valid, llm_valid, labels):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=1e4, max_iter=1000).fit(np.c_[logit(crm_valid), logit(llm_valid)], labels)


def with_ci(labels, users, probs: dict[str, np.ndarray]) -> dict:
    """Point AUC/LogLoss, the user-bootstrap CI of each, and each model's paired AUC gain over the CRM."""
    boot = bootstrap_metrics(labels, users, probs)
    out = {}
    for name, p in probs.items():
        point = binary_metrics(labels, p)
        out[name] = {
            "auc": point["auc"],
            "auc_ci": interval(boot[name][:, 0]),
            "logloss": point["logloss"],
            "logloss_ci": interval(boot[name][:, 1]),
        }
        if name != "crm":
            diff = boot[name][:, 0] - boot["crm"][:, 0]
            out[name] |= {
                "minus_crm_auc": point["auc"] - out["crm"]["auc"],
                "minus_crm_ci": interval(diff),
                "minus_crm_p": paired_p_value(diff),
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished `reclora run` directory")
    parser.add_argument("--config", default=None, help="default: the run's own config.yaml")
    parser.add_argument("--variants", nargs="+", default=["rella", "tallrec"], help="plain-LoRA variants to blend")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for name in args.variants:
        get_variant(name)  # an unknown name fails before any scoring
    run = RunDir(args.run)
    cfg = load_config(args.config or str(run.root / "config.yaml"))
    crm_variant = get_variant("reclora")
    crm_dir = run.crm(crm_name(cfg, crm_variant))
    crm_test = read_predictions(run.scores(f"crm-{crm_name(cfg, crm_variant)}"), ["sample_id", "p_yes"])

    # The validation rows with the columns the CRM reads (RecLoRA's retrieved histories); each
    # variant reads what it needs from the same rows.
    valid = fixed_subsample(load_samples(run.data, "valid", crm_variant), cfg.tune.valid_subsample, cfg.run.seed)
    crm_valid = CRMScorer(cfg, str(run.root), str(crm_dir), crm_variant.long_mode)(valid)["p_yes"].to_numpy()
    labels_valid = valid["label"].to_numpy()
    results = {}
    for name in args.variants:
        log.info("scoring %s on %d validation samples", name, len(valid))
        llm_valid = Scorer(cfg, str(run.root), name)(valid)["p_yes"].to_numpy()
        blend = fit_blend(crm_valid, llm_valid, labels_valid)

        test = read_predictions(run.scores(name), ["sample_id", "user_id", "label", "p_yes"])
        test = test.merge(crm_test[["sample_id", "p_yes"]].rename(columns={"p_yes": "crm"}), on="sample_id")
        probs = {
            "crm": test["crm"].to_numpy(),
            "llm": test["p_yes"].to_numpy(),
            "blend": blend.predict_proba(np.c_[logit(test["crm"]), logit(test["p_yes"])])[:, 1],
        }
        results[name] = {
            "valid": {
                "n": len(valid),
                "crm_auc": binary_metrics(labels_valid, crm_valid)["auc"],
                "llm_auc": binary_metrics(labels_valid, llm_valid)["auc"],
                "coef_crm_llm": blend.coef_[0].tolist(),
                "intercept": float(blend.intercept_[0]),
            },
            "test": {"n": len(test), "users": int(test["user_id"].nunique())}
            | with_ci(test["label"].to_numpy(), test["user_id"].to_numpy(), probs),
        }
        t = results[name]["test"]
        log.info(
            "%s: test AUC crm %.4f, llm %.4f, blend %.4f (blend - crm %+.4f, 95%% CI [%+.4f, %+.4f], p %.3f)",
            name,
            t["crm"]["auc"],
            t["llm"]["auc"],
            t["blend"]["auc"],
            t["blend"]["minus_crm_auc"],
            *t["blend"]["minus_crm_ci"],
            t["blend"]["minus_crm_p"],
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
