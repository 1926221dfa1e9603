#!/usr/bin/env bash
# base-image.sh [--rebuild]: a Docker base image made from Debian packages alone, for machines that
# reach package registries but no image registry. It holds Debian bookworm's python3 (3.11) with
# venv and redis-server: what the Dockerfile's stages need, so that
#   docker build --build-arg BASE_IMAGE=specserve-base:bookworm .
# builds the same image as the default base (python:3.11-slim) does on a machine with Docker Hub.
# The image trusts what this machine trusts: the certificate authorities added to this machine
# (/usr/local/share/ca-certificates) go into it, and pip there uses the system's CA bundle.
# Its tag is specserve-base:bookworm and specserve-base:bookworm-<hash of this script>;
# it is built again only when this script changes (or with --rebuild). Needs root (mmdebstrap).
set -euo pipefail
cd "$(dirname "$0")/.."

SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
PACKAGES=ca-certificates,python3,python3-venv,redis-server
IMAGE=specserve-base
version="$SUITE-$(sha256sum "$0" | cut -c1-12)"

if [ "${1:-}" != "--rebuild" ] && docker image inspect "$IMAGE:$version" >/dev/null 2>&1; then
  docker tag "$IMAGE:$version" "$IMAGE:$SUITE"
  echo "base-image: $IMAGE:$version is built already (--rebuild builds it again)"
  exit 0
fi

bash deploy/system-deps.sh mmdebstrap
work=$(mktemp -d "${TMPDIR:-/tmp}/specserve-base.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir "$work/ca"
cp /usr/local/share/ca-certificates/*.crt "$work/ca/" 2>/dev/null || true

echo "base-image: mmdebstrap $SUITE ($PACKAGES) ..."
mmdebstrap --quiet --variant=apt --format=tar --include="$PACKAGES" \
  --aptopt='APT::Install-Recommends "false"' \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --customize-hook="mkdir -p \"\$1/usr/local/share/ca-certificates\" && cp $work/ca/. \"\$1/usr/local/share/ca-certificates/\" -r" \
  --customize-hook='chroot "$1" update-ca-certificates --fresh >/dev/null' \
  --customize-hook='printf "[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n" >"$1/etc/pip.conf"' \
  "$SUITE" "$work/rootfs.tar" \
  "deb $MIRROR $SUITE main" "deb $MIRROR $SUITE-updates main" "deb $SECURITY_MIRROR $SUITE-security main"

docker import \
  --change 'ENV LANG=C.UTF-8' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["/bin/bash"]' \
  --message "Debian $SUITE with $PACKAGES (deploy/base-image.sh)" \
  "$work/rootfs.tar" "$IMAGE:$version" >/dev/null
docker tag "$IMAGE:$version" "$IMAGE:$SUITE"
echo "base-image: $IMAGE:$SUITE ($(docker image inspect --format '{{.Size}}' "$IMAGE:$version" | awk '{printf "%.0f MB", $1/1e6}'))"
