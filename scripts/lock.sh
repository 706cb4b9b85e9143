#!/usr/bin/env bash
# Refresh constraints.txt, the versions `scripts/setup.sh` installs: a fresh venv gets the newest versions
# pyproject.toml allows (set-up without constraints), the whole test suite runs against them, and only if it
# passes are they written down. Commit constraints.txt with the suite's result.
#
#   bash scripts/lock.sh
#
# torch is not locked: setup.sh installs the local CPU wheel first, or keeps the CUDA build a user already has.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
RADSYNTH_VENV="$venv" RADSYNTH_CONSTRAINTS=/dev/null bash scripts/setup.sh --test
HF_HUB_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false "$venv/bin/python" -m pytest -q
{
  echo "# The versions the test suite passed with on $(date -u +%Y-%m-%d) (scripts/lock.sh); setup.sh installs these."
  "$venv/bin/python" -m pip freeze --exclude-editable | grep -v -i -E '^(torch|nvidia-[a-z0-9-]+|triton)=='
} > constraints.txt
echo "constraints.txt refreshed: $(grep -c '==' constraints.txt) pins"
