#!/usr/bin/env bash
# The GPU check: one command, under 10 minutes on one NVIDIA GPU.
#
#   benchmarks/gpu.sh [OUT_DIR]        # logs + the benchmark's JSON in OUT_DIR (default .lmpipe/gpu-check)
#
#   1. the `gpu`-marked tests (tests/test_gpu.py): a CUDA bf16 training step, torch.compile,
#      cached generation equal to uncached, DDP over NCCL;
#   2. the smoke pipeline (`dvc repro`, every stage) in a scratch copy of this checkout, with
#      every `device` param set to cuda;
#   3. benchmarks/train.py on the GPU with the `gpu` profile's model: MFU against the GPU's bf16
#      matmul peak measured in the same run.
# Each part has its own time limit; the script prints PASS/FAIL per part and exits 1 if any
# failed, 2 when there is no usable NVIDIA GPU. Python: $PYTHON, else .venv/bin/python, else python3.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${1:-$ROOT/.lmpipe/gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=$ROOT/.venv/bin/python; else PY=$(command -v python3); fi
fi
export PATH="$(dirname "$PY"):$PATH" LMPIPE_MIRROR="${LMPIPE_MIRROR:-$(cd .. && pwd)/shared/data}"
export DVC_NO_ANALYTICS=1 MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=true LMPIPE_TRACKING=off

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu.sh: no NVIDIA GPU on this machine (nvidia-smi not found); run it on a GPU host" >&2
  exit 2
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu.sh: $PY has a torch without CUDA (or no driver); install the CUDA build of torch" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

declare -a RESULTS=()
started=$(date +%s)
part() {   # part NAME LIMIT_S COMMAND...: run one part under a time limit, log it, record PASS/FAIL
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  local verdict=PASS
  [ "$rc" -eq 0 ] || verdict="FAIL (exit $rc)"
  RESULTS+=("$(printf '%-10s %-16s %4ss' "$name" "$verdict" "$(( $(date +%s) - t0 ))")")
}

# 1. the gpu-marked tests
part gpu-tests 180 "$PY" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py

# 2. the smoke pipeline on cuda, in a scratch git + DVC copy (the checkout is not touched)
part smoke 180 "$PY" - "$OUT/smoke" <<'EOF'
import json, os, shutil, sys
from pathlib import Path

import yaml

from lmpipe.core.profiles import dump_params, profile_dict
from tests.helpers.repo import make_repo, run

root = Path(sys.argv[1])
shutil.rmtree(root, ignore_errors=True)
root.mkdir(parents=True)
env = make_repo(root, Path(os.environ["LMPIPE_MIRROR"]), "smoke")
params = profile_dict("smoke")
trained = ("rnn", "pretrain", "sft", "lora")
for stage in trained:
    params[stage]["train"]["device"] = "cuda"
params["evaluate"]["device"] = "cuda"
(root / "params.yaml").write_text(dump_params(params))
print(run(["dvc", "repro"], root, env, timeout=170).stdout[-3000:])
lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
devices = {s: lock[s]["params"]["params.yaml"][s]["train"]["device"] for s in trained}
assert set(devices.values()) == {"cuda"}, devices
pre = json.loads((root / "metrics" / "pretrain.json").read_text())
ev = json.loads((root / "metrics" / "evaluate.json").read_text())
print("dvc.lock: device cuda for", ", ".join(trained))
print("pretrain:", {k: pre[k] for k in ("val_loss", "val_bpb", "tokens_per_second")})
print("evaluate test_bpb:", {m: v["test_bpb"] for m, v in ev.items()})
EOF

# 3. the benchmark: the gpu profile's Transformer, MFU against the bf16 peak of this run
part benchmark 240 "$PY" benchmarks/train.py --device cuda --profile gpu --json "$OUT/train.json"

echo
echo "gpu.sh: $(head -1 "$OUT/gpu.txt"), $(( $(date +%s) - started )) s in all; logs in $OUT"
failed=0
for r in "${RESULTS[@]}"; do
  echo "  $r"
  case "$r" in *FAIL*) failed=1 ;; esac
done
exit $failed
