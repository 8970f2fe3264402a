#!/usr/bin/env bash
# The GPU serving path, on a machine with CUDA: the gpu-marked tests (exactness, training steps,
# the Triton runner on CUDA), a short training run on ML-1M on the GPU, the training step times
# by negatives mode, and the stream benchmark's PerSRec drain with Triton on the GPU (KIND_GPU).
# Writes var/gpu-check/gpu-check.json (and the files it names). Without CUDA it says so and
# exits 0. Usage: scripts/gpu-check.sh [OUT_DIR]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
py="${PYTHON:-$root/.venv/bin/python}"
out="${1:-$root/var/gpu-check}"
if ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu-check: no CUDA device here (torch.cuda.is_available() is False): nothing to check"
    exit 0
fi
mkdir -p "$out"
status=0
"$py" -m pytest tests/gpu -q -p no:cacheprovider --junitxml "$out/gpu-tests.xml" || status=1
"$py" benchmarks/train_step_bench.py --device cuda --out "$out/train_step_cuda.json" || status=1
PERSREC_DEVICE=cuda "$py" -m persrec.cli train --recipe best --epochs 3 --out "$out/train" || status=1
"$py" benchmarks/stream_bench.py --phases persrec --loads '' --work-dir "$out/stream" --out "$out/stream-results" || status=1
"$py" - "$out" "$status" <<'PY'
import json, sys, pathlib, torch
out, status = pathlib.Path(sys.argv[1]), int(sys.argv[2])
summary = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "ok": status == 0,
           "files": sorted(str(p.relative_to(out)) for p in out.rglob("*.json"))}
metrics = out / "train" / "metrics.json"
if metrics.exists():
    summary["train_test"] = json.loads(metrics.read_text())["test"]
(out / "gpu-check.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
PY
exit "$status"
