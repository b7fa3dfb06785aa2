#!/usr/bin/env bash
# Install Shoal with its test dependencies, build the templates the tests use (once: cached in
# /var/lib/shoal, instant when up to date), then run the whole test suite against real sandboxes.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install.sh --test
for template in minimal base code-interpreter-v1; do
  /opt/shoal/venv/bin/shoal template build "$template"
done
/opt/shoal/venv/bin/ruff check src tests
exec /opt/shoal/venv/bin/python -m pytest "$@"
