#!/usr/bin/env bash
# Install img2dataset (from PyPI, through the configured pip index) in the benchmark's own
# virtual environment, bench/out/i2d-venv, kept apart from PixCrawler's .venv so that neither
# tool's dependencies change the other's. Run once before bench/bench_vs_img2dataset.py.
#
#   bash bench/setup_img2dataset.sh            # creates or reuses bench/out/i2d-venv
#   I2D_VERSION=1.47.0 bash bench/setup_img2dataset.sh
#
# Pins (Python 3.11): img2dataset 1.47.0 is pinned so that figures stay comparable between runs;
# its own requirements install as published, no extra pins needed (albumentations<2,
# webdataset<0.3, fire<0.8, opencv-python-headless<5 and wandb all have 3.11 wheels). The bench
# runs it with NO_ALBUMENTATIONS_UPDATE=1 and WANDB_MODE=disabled, so it makes no network calls.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${HERE}/out/i2d-venv"
VERSION="${I2D_VERSION:-1.47.0}"
PYTHON="${PYTHON:-python3}"

mkdir -p "${HERE}/out"
if [ ! -x "${VENV}/bin/python" ]; then
    "${PYTHON}" -m venv "${VENV}"
fi
"${VENV}/bin/python" -m pip install --quiet --upgrade pip
"${VENV}/bin/python" -m pip install --quiet "img2dataset==${VERSION}"
NO_ALBUMENTATIONS_UPDATE=1 "${VENV}/bin/python" -c "import img2dataset"
echo "img2dataset ${VERSION} installed: ${VENV}/bin/img2dataset"
