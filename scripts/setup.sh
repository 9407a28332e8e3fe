#!/usr/bin/env bash
# One-command setup: a virtual environment with torch, sam2 (built against it) and the rest.
# Usage: bash scripts/setup.sh            (VENV=path to choose where the environment goes)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" torch==2.14.1 torchvision==0.29.1
# sam2 1.1.0 is an sdist whose build imports torch; no CUDA extension (see README, hole filling).
SAM2_BUILD_CUDA=0 "${PIP[@]}" --no-build-isolation sam2==1.1.0
"${PIP[@]}" -r requirements.txt -r requirements-dev.txt
"$VENV/bin/python" -c "import torch, sam2, av, cv2, fastapi; print('setup ok: torch', torch.__version__, '| cuda', torch.cuda.is_available())"
