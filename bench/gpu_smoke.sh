#!/usr/bin/env bash
# The GPU check of reclora-ray, for one H100/H200-class GPU, in under 8 minutes:
#   1. the arch check (reclora_ray.gpu: torch's kernels cover this GPU) and bf16 support;
#   2. the quickstart pipeline at GPU settings: auto dtype (bf16 where supported, else fp16), CRM
#      and tuning on 1 GPU (Ray Train + DeepSpeed), Ray Data embedding and scoring with num_gpus=1;
#   3. the personalized-LoRA overhead bench (bench/plora_overhead.py, its GPU settings);
#   4. the 7B-shaped scoring bench (bench/score_throughput.py --shape llama-7b, random weights).
# Prints one JSON line (also written to OUT/gpu_smoke.json; with --save, to
# bench/results/gpu_smoke_<gpu>.json). Every step has its own time limit; a failed or timed-out
# step is recorded in the JSON and the script exits 1.
#
#   bench/gpu_smoke.sh [--out DIR] [--save]
#   bench/gpu_smoke.sh --dry-run      # CPU, tiny config, small benches: checks this script's plumbing
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"

DRY_RUN=0 SAVE=0 OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --save) SAVE=1 ;;
    --out) OUT="$2"; shift ;;
    *) echo "usage: $0 [--dry-run] [--save] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
OUT="${OUT:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-smoke-XXXXXX")}"
mkdir -p "$OUT/steps"
STARTED=$(date +%s)

# step NAME LIMIT_S CMD...: runs CMD under a time limit, keeps its log, its last stdout line
# (each bench prints one JSON line last) and its status.
step() {
  local name="$1" limit="$2"; shift 2
  local t0=$(date +%s) rc
  echo "== $name (limit ${limit}s): $*" >&2
  timeout --kill-after=10 "$limit" "$@" > "$OUT/steps/$name.out" 2> "$OUT/steps/$name.log"
  rc=$?
  echo "$rc $(( $(date +%s) - t0 ))" > "$OUT/steps/$name.status"
  [ $rc -eq 0 ] || { echo "   $name failed (rc $rc); log: $OUT/steps/$name.log" >&2; tail -5 "$OUT/steps/$name.log" >&2; }
  return 0
}

if [ $DRY_RUN -eq 1 ]; then
  DEVICE=cpu CONFIG=tiny
  SETS=(--set run.num_cpus=2 --set crm.num_workers=1 --set crm.cpus_per_worker=1
        --set "tune.variants=[reclora]" --set score.zero_shot=false)
  PLORA=(--shapes 135m --batch 1 --seq 32 --warmup 0 --repeats 1)
  SCORE=(--shape smollm2-135m --layers 2 --prompts 16 --batch-size 8 --rounds 1 --generate-tokens 2)
  LIMITS=(120 1800 600 600)  # a CPU plumbing check: slow on a loaded machine
else
  DEVICE=cuda CONFIG=quickstart
  SETS=(--set tune.use_gpu=true --set tune.num_workers=1 --set tune.grad_accum=2
        --set crm.use_gpu=true --set crm.num_workers=1
        --set embed.num_gpus=1 --set embed.concurrency=1
        --set score.num_gpus=1 --set score.concurrency=1 --set score.batch_size=64)
  PLORA=(--device cuda --dtype bfloat16 --batch 8 --seq 512 --batch-7b 4 --seq-7b 0 --layers-7b 4 --repeats 5)
  SCORE=(--shape llama-7b --device cuda --dtype bfloat16 --prompts 256 --batch-size 32 --rounds 2)
  LIMITS=(30 240 90 90)  # 7.5 min at most, plus the JSON
fi

# 1. the start-up check every GPU worker makes, and the dtype `llm.dtype: auto` resolves to
step arch "${LIMITS[0]}" "$PYTHON" -c "
import json, torch
from reclora_ray.gpu import check_device
cuda = '$DEVICE' == 'cuda'
if cuda:
    check_device('cuda')
print(json.dumps({'torch': torch.__version__, 'cuda_available': torch.cuda.is_available(),
    'device': torch.cuda.get_device_name() if cuda else 'cpu',
    'capability': '.'.join(map(str, torch.cuda.get_device_capability())) if cuda else None,
    'arch_list': torch.cuda.get_arch_list(),
    'dtype': ('bfloat16' if torch.cuda.is_bf16_supported() else 'float16') if cuda else 'float32'}))"
DTYPE=$(tail -1 "$OUT/steps/arch.out" 2>/dev/null | "$PYTHON" -c "import json,sys; print(json.load(sys.stdin)['dtype'])" 2>/dev/null || echo float32)
# `llm.dtype: auto` where the config has it, else the dtype it would pick
if "$PYTHON" -c "from reclora_ray.config import load_config; load_config('$CONFIG', ['llm.dtype=auto'])" 2>/dev/null; then
  DTYPE=auto
fi

# 2. the pipeline (its metrics.json is the last thing `reclora run` prints, as indented JSON)
step pipeline "${LIMITS[1]}" "$PYTHON" -c "
import json, sys
from reclora_ray.cli import main
code = main(sys.argv[1:])
print(json.dumps(json.load(open('$OUT/run/metrics.json'))))
sys.exit(code)" run --config "$CONFIG" "${SETS[@]}" --set "llm.dtype=$DTYPE" --out "$OUT/run"

# 3. personalized-LoRA overhead; 4. 7B-shaped scoring on the pipeline's prepared data
step plora_overhead "${LIMITS[2]}" "$PYTHON" bench/plora_overhead.py "${PLORA[@]}"
step score_7b "${LIMITS[3]}" "$PYTHON" bench/score_throughput.py --data "$OUT/run/data" "${SCORE[@]}"

"$PYTHON" - "$OUT" "$DRY_RUN" "$SAVE" "$(( $(date +%s) - STARTED ))" <<'EOF'
import json, re, sys
from pathlib import Path

out, dry_run, save, total = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "1", int(sys.argv[4])
result, ok = {"dry_run": dry_run, "total_s": total}, True
for name in ("arch", "pipeline", "plora_overhead", "score_7b"):
    status = out / "steps" / f"{name}.status"
    rc, seconds = map(int, status.read_text().split()) if status.exists() else (-1, 0)
    lines = (out / "steps" / f"{name}.out").read_text().strip().splitlines() if rc >= 0 else []
    try:
        value = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        value = None
    result[name] = {"rc": rc, "seconds": seconds, "result": value}
    ok = ok and rc == 0 and value is not None
result["ok"] = ok
line = json.dumps(result)
(out / "gpu_smoke.json").write_text(line + "\n")
if save and not dry_run:
    device = (result["arch"]["result"] or {}).get("device", "unknown")
    name = re.sub(r"[^a-z0-9]+", "_", device.lower()).strip("_")
    Path("bench/results", f"gpu_smoke_{name}.json").write_text(line + "\n")
print(line)
sys.exit(0 if ok else 1)
EOF
