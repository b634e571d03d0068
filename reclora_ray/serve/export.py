"""`reclora export-adapter`: one user's personalized adapter as a standard PEFT LoRA, without a server.

    reclora export-adapter --config quickstart --run OUT --user 12 --item 50 --out adapters/u12
    reclora export-adapter --config quickstart --run OUT --user 12 --item 50 --out models/u12 --merge

--user and --item are catalogue ids. The adapter is the one `POST /users/{id}/adapter/export`
returns: the gate's mix for that user and target (R_c depends on the target), from the user's
whole prepared history; `PeftModel.from_pretrained(base, DIR)` loads it. --merge writes the base
model with that adapter merged into its weights (plus the tokenizer), a plain Hugging Face model
for a single user. DIR/reclora_export.json records what was exported.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

from reclora_ray.runtime import config_from_args

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="quickstart", help="packaged config name or YAML path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--run", required=True, help="the finished run directory")
    parser.add_argument("--user", required=True, help="catalogue user id")
    parser.add_argument("--item", required=True, help="catalogue item id of the target")
    parser.add_argument("--out", required=True, help="the folder to write (must not exist)")
    parser.add_argument("--merge", action="store_true", help="write a merged full model instead of the adapter")
    parser.add_argument("--variant", help="the tuned variant to export; default serve.variant")
    parser.add_argument("--timestamp", type=int, help="scoring time, unix seconds (R_c reads it); default now")


def export_adapter(
    cfg,
    run: str | Path,
    user,
    item,
    out: str | Path,
    merge: bool = False,
    variant: str | None = None,
    timestamp: int | None = None,
) -> Path:
    from reclora_ray.serve.online import OnlineScorer, RequestError, serving_config

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; export-adapter writes a new folder")
    if merge and cfg.llm.load_in_8bit:
        raise ValueError("--merge needs a full-precision base: add --set llm.load_in_8bit=false")
    online = OnlineScorer(cfg, run, variant or cfg.serve.variant)
    try:
        (target,) = online.check_items([item], "--item")
    except RequestError as exc:
        raise ValueError(str(exc)) from None
    state = online.user_state(user, timestamp=timestamp)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        adapter_dir = tmp / "adapter" if merge else tmp
        try:
            online.export_adapter(state, int(target), adapter_dir)
        except RequestError as exc:
            raise ValueError(str(exc)) from None
        if merge:
            _merge(serving_config(cfg), adapter_dir, tmp)
            shutil.rmtree(adapter_dir)
        record = {
            "variant": online.variant.name,
            "model_version": online.version,
            "user": state.raw_user_id,
            "item": online.catalogue.item_raw[target],
            "timestamp": state.timestamp,
            "known_user": state.known_user,
            "history_length": len(state.items),
            "merged": merge,
            "cold_start_item": bool(online.catalogue.cold_items[target]),
        }
        (tmp / "reclora_export.json").write_text(json.dumps(record, indent=2))
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported %s for user %s, item %s to %s", "a merged model" if merge else "the adapter", user, item, out)
    return out


def _merge(cfg, adapter_dir: Path, out: Path) -> None:
    from peft import PeftModel

    from reclora_ray.base_model import load_base

    base, tokenizer = load_base(cfg.llm, device="cpu")
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def main(args: argparse.Namespace) -> int:
    export_adapter(
        config_from_args(args), args.run, args.user, args.item, args.out, args.merge, args.variant, args.timestamp
    )
    return 0
