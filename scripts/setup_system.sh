#!/usr/bin/env bash
# System packages the slow tests use: Chromium (MLflow UI tests), Slurm + munge (cluster tests), shellcheck.
# Idempotent; needs root (CI and the developer machines run as root).
set -euo pipefail
need=()
command -v chromium >/dev/null || need+=(chromium)
command -v slurmctld >/dev/null || need+=(slurmctld slurmd slurm-client munge)
command -v shellcheck >/dev/null || need+=(shellcheck)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
