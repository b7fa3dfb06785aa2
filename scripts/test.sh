#!/usr/bin/env bash
# Install Shoal with its test dependencies, then run the whole test suite against real sandboxes.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh --test
exec /opt/shoal/venv/bin/python -m pytest "$@"
