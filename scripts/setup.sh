#!/usr/bin/env bash
# Installs everything ccat-dagster needs on a fresh Debian 12 machine (idempotent):
#   - Debian packages: bubblewrap (container runtime used where Apptainer is absent), Debian's python3 with
#     numpy/astropy/matplotlib (what the example reduction software imports inside the container),
#     PostgreSQL client, docker-registry (the CNCF distribution registry that the registry-digest tests start
#     on a free port and push to; its system service is not needed); with --with-browser also chromium +
#     chromium-driver for the UI test.
#   - the project's virtual environment .venv with the package and its dev dependencies, pinned by
#     constraints.txt.
# Usage: scripts/setup.sh [--with-browser]
set -euo pipefail
cd "$(dirname "$0")/.."

with_browser=0
for arg in "$@"; do
  case "$arg" in
    --with-browser) with_browser=1 ;;
    *) echo "setup.sh: unknown option $arg (allowed: --with-browser)" >&2; exit 2 ;;
  esac
done

packages=(bubblewrap python3 python3-numpy python3-astropy python3-matplotlib postgresql-client docker-registry)
[ "$with_browser" = 1 ] && packages+=(chromium chromium-driver)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: missing Debian packages ${missing[*]}; run as root or install them with apt-get" >&2
    exit 1
  fi
  echo "setup.sh: installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# constraints.txt pins every dependency to the versions CI runs (scripts/update-constraints.sh regenerates it).
.venv/bin/python -m pip install -q -c constraints.txt -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
# Byte-compile the package as pip does for a regular install: every run worker and local job wrapper is a fresh
# interpreter, and without cached bytecode (PYTHONDONTWRITEBYTECODE, read-only trees) each recompiles it.
.venv/bin/python -m compileall -q ccat_dagster >/dev/null
.venv/bin/python -c "import ccat_dagster, dagster; print('setup.sh: ccat-dagster ready (dagster', dagster.__version__ + ')')"
