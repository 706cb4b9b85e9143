#!/usr/bin/env bash
# Set up radsynth in ./.venv: `bash scripts/setup.sh` for running, `bash scripts/setup.sh --test` adds test tools.
#
# torch is installed before the project so that pip keeps it: a torch already in .venv (for example a
# CUDA build you installed) is left alone; otherwise RADSYNTH_TORCH (default torch==2.13.0) is installed,
# which on the project's CPU machines resolves to the local CPU wheel rather than gigabytes of CUDA packages.
# Everything else comes at the versions in constraints.txt, those the test suite last passed with, so every fresh
# machine gets the same environment (refresh them with scripts/lock.sh; `pip install radsynth` keeps the ranges).
# RADSYNTH_VENV and RADSYNTH_CONSTRAINTS (default .venv and constraints.txt) are for scripts/lock.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
if [ "${1:-}" = "--test" ]; then extras="[test]"; fi
venv="${RADSYNTH_VENV:-.venv}"
constraints="${RADSYNTH_CONSTRAINTS:-constraints.txt}"

# pip, minus the warnings of a pip config that names local indexes which may be absent (pip's status is kept).
pip_install() { "$venv/bin/python" -m pip install --quiet "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  pip_install "${RADSYNTH_TORCH:-torch==2.13.0}"
fi
pip_install --constraint "$constraints" --editable ".${extras}"
if [ -n "$extras" ]; then
  # nnU-Net's own dataset integrity check, which the release tests run on our output. nnunetv2's declared
  # dependencies pull torch 2.15 + CUDA + torchvision, so it comes without them, plus what the check imports.
  pip_install --constraint "$constraints" --no-deps nnunetv2 batchgenerators acvl-utils
  pip_install --constraint "$constraints" pandas scikit-image SimpleITK blosc2
  # Debian's chromium renders the release's HTML report in a test (which skips without it).
  if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "chromium could not be installed: the report rendering test will skip" >&2
  fi
fi
"$venv/bin/python" -c "import torch, radsynth.flows.cli; print(f'radsynth ready: torch {torch.__version__}')"
