#!/usr/bin/env bash
# Set up everything the tests need from a fresh clone, then run them.
#   bash tests/run.sh [pytest args]
# Installs into ./.venv: torch pinned to the CPU build (an unpinned torch pulls CUDA packages),
# the package with its test and ml extras at the versions in tests/constraints.txt, and Debian's
# chromium (the browser test) and postgresql (the job store on PostgreSQL) when running as root
# (otherwise, where they are missing, those tests skip).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -c tests/constraints.txt -e ".[test,ml]"
missing=""
[ -x /usr/bin/chromium ] || missing="chromium"
command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
  || missing="$missing postgresql"
if [ -n "$missing" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null) \
    || echo "$missing could not be installed: the browser / PostgreSQL tests will be skipped" >&2
fi
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
