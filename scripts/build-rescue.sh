#!/usr/bin/env bash
# Build dingyuan-rescue.pyz, the rescue tool as one file for a stock python3 (docs/rescue.md).
#   bash scripts/build-rescue.sh [OUT]      (default: ./dingyuan-rescue.pyz)
# A running vault serves the same file at GET /api/v1/rescue.pyz.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}" exec python3 -m dingyuan.rescue.build "${1:-dingyuan-rescue.pyz}"
