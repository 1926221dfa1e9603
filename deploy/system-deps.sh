#!/usr/bin/env bash
# system-deps.sh COMMAND[=PACKAGE] ...: makes sure each COMMAND is on this machine, installing the
# Debian PACKAGE that provides it (default: the command's own name) when it is missing.
# As root: `apt-get update` once, then `apt-get install -y` of every missing package.
# Otherwise: one line naming the exact command to run, and exit 1. Nothing is skipped silently.
set -euo pipefail

missing=()
for spec in "$@"; do
  command_name=${spec%%=*}
  package=${spec#*=}
  command -v "$command_name" >/dev/null 2>&1 || missing+=("$package")
done
[ ${#missing[@]} -eq 0 ] && exit 0

install="apt-get update && apt-get install -y ${missing[*]}"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: missing ${missing[*]}; this is not a Debian-like system: install them with its package manager" >&2
  exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "system-deps: missing ${missing[*]}: run as root: sudo sh -c '$install'" >&2
  exit 1
fi
echo "system-deps: installing ${missing[*]} (apt-get) ..." >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}" >/dev/null
for spec in "$@"; do
  command -v "${spec%%=*}" >/dev/null 2>&1 || { echo "system-deps: ${spec#*=} is installed but gives no ${spec%%=*}" >&2; exit 1; }
done
