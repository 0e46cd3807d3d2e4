#!/usr/bin/env bash
# Set up (scripts/install.sh) and run the main job on the embedded default: tiny AF3, synthetic AudioCaps,
# a local Ray instance, CPU only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/af3dist main --config tiny "$@"
