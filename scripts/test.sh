#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, lint, types, then every test (integration included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${FCGISPAWN_VENV:-.venv}
echo "== ruff"; "$VENV/bin/ruff" check .
echo "== mypy --strict"; "$VENV/bin/mypy"
echo "== pytest"
set +e
"$VENV/bin/pytest" "$@"
rc=$?
set -e
# pytest exits 5 when it collected no test: that must fail, never pass silently.
if [ "$rc" -eq 5 ]; then echo "test.sh: pytest ran no tests" >&2; exit 1; fi
exit "$rc"
