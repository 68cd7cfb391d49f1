#!/usr/bin/env bash
# Prove the CUDA paths on a machine with an NVIDIA GPU. Parts, each runnable alone:
#   unit    the unit tier, torch on CUDA wherever the code says "auto"
#   track   `bench track` at the paper's 50 timestamps x 16 views (the fitter on CUDA)
#   dense   a small synthetic capture, then `bench dense` (the torch MVS on CUDA; COLMAP PatchMatch beside it
#           where pycolmap has CUDA)
#   train   `train` with pipelines/train_large.toml (bf16, activation checkpointing, launched by torchrun) on a
#           random store at NeRSemble's working size, then the same run split in two halves with a resume
# Usage: scripts/gpu-check.sh OUT PART [PART ...]. Each part writes OUT/PART.log and OUT/PART.json (the
# commands' own --json lines; train: straight, first half, resumed half, and OUT/train.metrics.jsonl).
# Environment: FACECANON (how to call the CLI, default facecanon-data), TRAIN_CONFIG (default
# pipelines/train_large.toml), TRAIN_STEPS (optimizer steps of the straight run, default 100).
set -uo pipefail
out=${1:?usage: scripts/gpu-check.sh OUT PART [PART ...]}
shift
mkdir -p "$out"
cli=${FACECANON:-facecanon-data}
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-XXXXXX")
trap 'rm -rf "$work"' EXIT
json_lines() { grep '^{' || true; }
stamp() { echo "== $(date +%T) $*"; }

part_unit() {
  python3 -m pytest -q -m unit -p no:cacheprovider -n 8 tests 2>&1 | tail -40
}

part_track() {
  $cli bench track --timestamps 50 --json 2>&1 | tee "$work/track.out"
  json_lines < "$work/track.out" > "$out/track.json"
}

part_dense() {
  $cli synth --out "$work/cap" --subjects 1 --sequences 1 --frames 3 --no-verify --json | tail -1
  $cli bench dense --root "$work/cap/capture" --timestamps 3 --json 2>&1 | tee "$work/dense.out"
  json_lines < "$work/dense.out" > "$out/dense.json"
}

part_train() {
  local steps=${TRAIN_STEPS:-100}
  echo "random store: 3 subjects x 4 timestamps x 16 views x 550 x 802"
  python3 - "$work/store" <<'EOF'
import sys
sys.path.insert(0, "tests")
from fakes import fake_subject
from facecanon_data.store import build_index, write_subject
for i in range(3):
    write_subject(sys.argv[1], fake_subject(f"9{i:02d}", t=4, views=16, h=550, w=802, seed=i))
build_index(sys.argv[1])
EOF
  run() { torchrun --standalone --nproc_per_node 1 -m facecanon_data.cli train --store "$work/store" \
            --config "${TRAIN_CONFIG:-pipelines/train_large.toml}" --json "$@" 2>&1 | tee -a "$work/train.out"; }
  stamp "straight: $steps steps"; run --out "$work/straight" --steps "$steps"
  stamp "halves: $((steps / 2)) steps, then resumed to $steps"
  run --out "$work/resumed" --steps $((steps / 2)); run --out "$work/resumed" --steps "$steps"
  json_lines < "$work/train.out" > "$out/train.json"
  for r in straight resumed; do sed "s/^{/{\"run\": \"$r\", /" "$work/$r/metrics.jsonl"; done > "$out/train.metrics.jsonl"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -2
python3 -c "import torch, numpy; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'numpy', numpy.__version__)"
status=0
for part in "$@"; do
  if ! declare -F "part_$part" > /dev/null; then echo "unknown part $part (unit, track, dense, train)"; exit 2; fi
  stamp "$part"
  "part_$part" > >(tee "$out/$part.log") 2>&1 || status=1
  stamp "$part done"
done
exit $status
