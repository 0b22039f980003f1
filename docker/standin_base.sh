#!/usr/bin/env bash
# For machines without an image registry (like the project's CI machines): build a local stand-in for
# python:3.11-slim from Debian bookworm packages, with this machine's CA certificates (an outbound TLS
# proxy) and its local wheels (PIP_FIND_LINKS, e.g. the torch CPU wheel) copied in, and tag it with the
# name Dockerfile.cpu's FROM uses, so the Dockerfile builds unchanged. Needs root and debootstrap.
# Usage: docker/standin_base.sh [ROOTFS_DIR]     (DOCKER_HOST chooses the engine)
set -euo pipefail
rootfs=${1:-/tmp/selfdistill-standin-rootfs}
[[ -x $rootfs/usr/bin/apt-get ]] || debootstrap --variant=minbase bookworm "$rootfs" >/dev/null
cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/" 2>/dev/null || true
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
chroot "$rootfs" sh -c 'apt-get update -q && apt-get install -y -q --no-install-recommends python3 python3-venv \
  ca-certificates && update-ca-certificates && rm -rf /var/lib/apt/lists/*' >/dev/null
ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
# pip in a venv trusts certifi's bundle, not the system's: point it at the system bundle (with the proxy's CA).
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
links=${PIP_FIND_LINKS:-}
if [[ -n $links && -d $links ]]; then
  mkdir -p "$rootfs/opt/wheels" && cp "$links"/*.whl "$rootfs/opt/wheels/"
  printf 'find-links = /opt/wheels\n' >>"$rootfs/etc/pip.conf"
fi
tar -C "$rootfs" -c . | docker import - python:3.11-slim
echo "standin_base.sh: python:3.11-slim is a local stand-in ($(chroot "$rootfs" python3 --version))"
