#!/usr/bin/env bash
# The scheduled check of the Python versions CI does not run (CI runs 3.11): for each interpreter given (default
# python3.12 python3.13) build the wheel, install it with constraints.txt into a fresh venv, and run the demo
# from it outside the checkout: db upgrade, demo seed, demo run (exit 0 and final products expected).
#     scripts/check-python-versions.sh [python3.12 python3.13 ...]
# Needs PyPI (or a mirror) and bubblewrap; takes a few minutes per version. Prints one verdict line each.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
interpreters=("$@")
[ ${#interpreters[@]} -gt 0 ] || interpreters=(python3.12 python3.13)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
.venv/bin/python -m build --wheel --no-isolation --outdir "$work/dist" . >/dev/null
wheel=$(ls "$work"/dist/ccat_dagster-*.whl)
status=0
for python in "${interpreters[@]}"; do
  dir="$work/$python"
  mkdir -p "$dir/run"
  if ! "$python" -m venv "$dir/venv" >/dev/null 2>&1; then
    echo "$python: no such interpreter"; status=1; continue
  fi
  if ! "$dir/venv/bin/pip" install -q -c "$repo/constraints.txt" "$wheel" >"$dir/install.log" 2>&1; then
    echo "$python: install failed (see below)"; tail -5 "$dir/install.log"; status=1; continue
  fi
  if (cd "$dir/run" && env -u CCAT_OPS_DB_URL -u DAGSTER_HOME -u CCAT_DAGSTER_DATA_DIR \
        "$dir/venv/bin/ccat-dagster" db upgrade && "$dir/venv/bin/ccat-dagster" demo seed --scans 2 \
        && "$dir/venv/bin/ccat-dagster" demo run) >"$dir/demo.log" 2>&1; then
    echo "$python: ok ($("$dir/venv/bin/python" -V), $(grep -c '^  #' "$dir/demo.log") final products)"
  else
    echo "$python: demo failed"; tail -15 "$dir/demo.log"; status=1
  fi
done
exit $status
