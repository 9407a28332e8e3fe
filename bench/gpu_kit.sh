#!/usr/bin/env bash
# Runs the GPU benchmark cells on a machine without network access (Python 3.12, torch present).
#
#   bash bench/gpu_kit.sh wheels        # here, with network: Python 3.12 wheels into .whl/
#   bash bench/gpu_kit.sh install       # there: install .whl/ into /tmp/site (prints the export)
#   bash bench/gpu_kit.sh cell NAME...  # there: run bench cells, JSON + tables into $OUT (or bench-out/)
#   bash bench/gpu_kit.sh lease [NAME...]   # there, in one device call: install, run the cells
#                                           # (default: the seven that fit 15 minutes), pack $OUT
#
# Cells, most telling first (each prints one table; see bench/README.md):
#   tiny1080-300   tiny, 1920x1080, 300 frames, 3 objects, Meta vs ours
#   tiny1080-3000  tiny, 1920x1080, 3000 frames, ours only (Meta's init_state needs ~36 GB of frames)
#   large1080-300  large, 1920x1080, 300 frames, 1 object, Meta vs ours
#   tiny1080-150, large1080-150   the same, 150 frames (a short device lease)
#   tiny1080-150-batched   ours only, 3 objects with SAM2_BATCH_OBJECTS=exact (is it faster on
#                  the GPU? used only where its start-up check passes: see fidelity's row)
#   tiny1080-150-exactdevice   ours only, 3 objects with SAM2_FRAME_RESIZE=exact-device (PIL's
#                  resize redone bit for bit on the GPU: is it faster than PIL on the host?)
#   paired-tiny1080   tiny, 1920x1080, 150 frames, 3 objects: Meta and ours in one process, calls
#                  alternated (bench/paired.py; ratios a slow spell cannot skew); ~2 min
#   tiny720-300    tiny, 1280x720, 300 frames, Meta vs ours
#   large720-300   large, 1280x720, 300 frames, Meta vs ours
#   first-mask     upload -> first mask over HTTP, 300 and 3000 frames (bench/first_mask.py)
#   fidelity       our masks vs Meta's predictor on CUDA, per CUDA setting (bench/gpu_profile.py)
#   profile-tiny1080, profile-large1080   GPU time per frame by model stage, kernels, syncs
# BENCH_ARGS / FIRST_MASK_ARGS / PAIRED_ARGS are appended to a cell's flags (later flags win), e.g. for a dry
# run on a CPU: BENCH_ARGS="--width 160 --height 120 --frames 5 --image-size 256".
set -euo pipefail
cd "$(dirname "$0")/.."

# What the device image lacks (its package list is in the device tool's KINDS.md), pinned to
# the versions CI uses. torch, torchvision, numpy, pillow, opencv, httpx, tqdm, pyyaml, anyio,
# h11, portalocker and typing-extensions are already there.
WHEELS=(
  fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 pydantic==2.14.3 pydantic_core==2.50.4
  pydantic-settings==2.16.3 python-dotenv==1.2.4 annotated-types==0.8.0 typing-inspection==0.4.5
  uvicorn==0.54.0 python-multipart==0.0.34 hydra-core==1.3.8 omegaconf==2.3.1
  antlr4-python3-runtime==4.9.3 iopath==0.1.10 av==18.1.0 typing_extensions==4.16.0
  opentelemetry-api==1.45.2 pycocotools==2.0.11 fastapi-offline==1.7.7
)

wheels() {
  local exclude
  exclude=$(git rev-parse --git-path info/exclude)
  mkdir -p "$(dirname "$exclude")"
  grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
  mkdir -p .whl
  local plat=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    plat+=(--platform "$p")
  done
  for w in "${WHEELS[@]}"; do  # one at a time: the sdist-only ones need the fallback below
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp "${plat[@]}" -d .whl "$w" 2>/dev/null \
    || python3 -m pip wheel -q --no-deps -w .whl "$w"   # pure-Python sdists (antlr4, iopath)
  done
  # sam2 is an sdist needing torch at build time; without CUDA it builds a py3-none-any wheel.
  SAM2_BUILD_CUDA=0 .venv/bin/pip wheel -q --no-deps --no-build-isolation -w .whl sam2==1.1.0
  ls -1 .whl && du -sh .whl
}

install() {
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  echo "export PYTHONPATH=/tmp/site"
}

cell() {
  local out="${OUT:-bench-out}"
  mkdir -p "$out"
  export PYTHONUNBUFFERED=1
  for name in "$@"; do
    local args batch=auto resize=exact
    case "$name" in
      tiny1080-300)  args="--model tiny --width 1920 --height 1080 --frames 300 --objects 3" ;;
      tiny1080-3000) args="--model tiny --width 1920 --height 1080 --frames 3000 --skip-meta" ;;
      large1080-300) args="--model large --width 1920 --height 1080 --frames 300" ;;
      tiny1080-150)  args="--model tiny --width 1920 --height 1080 --frames 150 --objects 3" ;;
      large1080-150) args="--model large --width 1920 --height 1080 --frames 150" ;;
      tiny1080-150-batched)  # ours only, memory attention and memory encoder over objects
        args="--model tiny --width 1920 --height 1080 --frames 150 --objects 3 --skip-meta"
        batch=exact ;;
      tiny1080-150-exactdevice)  # ours only, frames resized on the GPU with Pillow's arithmetic
        args="--model tiny --width 1920 --height 1080 --frames 150 --objects 3 --skip-meta"
        resize=exact-device ;;
      tiny720-300)   args="--model tiny --width 1280 --height 720 --frames 300" ;;
      large720-300)  args="--model large --width 1280 --height 720 --frames 300" ;;
      paired-tiny1080)
        # shellcheck disable=SC2086
        python3 bench/paired.py --model tiny --width 1920 --height 1080 --frames 150 --objects 3 \
          --clicks 10 --propagations 2 --json "$out/$name.json" ${PAIRED_ARGS:-} 2>&1 \
          | tee "$out/$name.txt"
        continue ;;
      first-mask)
        python3 bench/first_mask.py --frames 300,3000 --width 1920 --height 1080 ${FIRST_MASK_ARGS:-} \
          2>&1 | tee "$out/$name.txt"
        continue ;;
      fidelity|profile-tiny1080|profile-large1080)
        case "$name" in
          fidelity) args="fidelity --frames 40 --objects 2" ;;
          profile-tiny1080) args="profile --model tiny --width 1920 --height 1080 --frames 60 --repeats 2" ;;
          profile-large1080) args="profile --model large --width 1920 --height 1080 --frames 60" ;;
        esac
        # shellcheck disable=SC2086
        python3 bench/gpu_profile.py $args ${PROFILE_ARGS:-} --out "$out" --name "$name" 2>&1 \
          | grep -v '^USDT:' | tee "$out/$name.log"
        continue ;;
      *) echo "unknown cell $name" >&2; exit 2 ;;
    esac
    # shellcheck disable=SC2086
    SAM2_BATCH_OBJECTS=$batch SAM2_FRAME_RESIZE=$resize python3 bench/bench.py $args ${BENCH_ARGS:-} --json "$out/$name.json" \
      2>&1 | tee "$out/$name.txt"
  done
}

# One device lease: install, then each cell in turn; after each, everything so far is packed
# into $OUT/results.tgz (a lease returns at most 8 files, and a run cut off by its time limit
# still returns what it measured). Seconds per cell on an H100 (2026-11-25): fidelity 33,
# tiny1080-150 94, large1080-150 76, profile-tiny1080 55, tiny1080-300 202, large1080-300 143.
lease() {
  if [ -z "${SKIP_INSTALL:-}" ]; then  # SKIP_INSTALL=1: a dry run where everything is installed
    install >/dev/null
    export PYTHONPATH=/tmp/site
  fi
  [ $# -gt 0 ] || set -- fidelity tiny1080-150 tiny1080-150-exactdevice profile-tiny1080 \
    large1080-150 profile-large1080 tiny1080-150-batched
  local out="${OUT:-bench-out}" work=/tmp/gpu-cells
  mkdir -p "$out" "$work"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  for name in "$@"; do
    local t0=$SECONDS
    OUT="$work" cell "$name" > "$work/$name.out" 2>&1 || echo "cell $name FAILED"
    echo "== $name $((SECONDS - t0)) s"
    grep -v -E 'USDT|it/s\]|frame loading|UserWarning|_warn_once' "$work/$name.out" | tail -n 40
    tar czf "$out/results.tgz" -C "$(dirname "$work")" "$(basename "$work")"
  done
}

case "${1:-}" in
  wheels) wheels ;;
  install) install ;;
  cell) shift; cell "$@" ;;
  lease) shift; lease "$@" ;;
  *) sed -n 2,22p "$0"; exit 2 ;;
esac
