#!/usr/bin/env bash
# Installs the Debian packages named as arguments when their command is missing.
# Usage: scripts/system-deps.sh nginx:nginx-light wrk:wrk   (command:package; command may be a path glob)
set -euo pipefail
need=()
for spec in "$@"; do
  cmd=${spec%%:*}; pkg=${spec#*:}
  # A command with a slash is a path glob: /usr/lib/postgresql/*/bin/postgres:postgresql
  if [[ $cmd == */* ]]; then compgen -G "$cmd" >/dev/null && continue; need+=("$pkg"); continue; fi
  if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then need+=("$pkg"); fi
done
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
echo "installing system packages: ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
