#!/usr/bin/env bash
# System packages the slow tests use: Chromium (MLflow UI tests), Slurm + munge (cluster tests), shellcheck.
# Idempotent; needs root (CI and the developer machines run as root). Never `playwright install`: it downloads a
# browser of its own; the tests drive Debian's /usr/bin/chromium.
set -euo pipefail
SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
updated=""
install() {  # install [apt options] packages...
  [ -n "$updated" ] || { $SUDO apt-get update -qq; updated=1; }
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}
command -v chromium >/dev/null || install chromium
command -v slurmctld >/dev/null || install --no-install-recommends slurmctld slurmd slurm-client munge
command -v shellcheck >/dev/null || install --no-install-recommends shellcheck
