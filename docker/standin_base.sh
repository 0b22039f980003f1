#!/usr/bin/env bash
# For machines without an image registry (like the project's CI machines): build a local stand-in for a
# Dockerfile's base image and tag it with the name its FROM uses, so the Dockerfile builds unchanged.
#   cpu: python:3.11-slim from Debian bookworm packages (Python 3.11 and its headers), with the local wheels (PIP_FIND_LINKS,
#        e.g. the torch CPU wheel) copied in.
#   gpu: nvidia/cuda:13.0.0-devel-ubuntu24.04 from Ubuntu noble packages, WITHOUT CUDA (no nvcc, no CUDA
#        libraries): good for Dockerfile.gpu's layers up to `--target stack` (apt, user, torch, vLLM), which
#        need no CUDA to install; flash-attn's compile and the project layer need the real base.
# Both get this machine's CA certificates (an outbound TLS proxy) and a pip.conf that trusts them.
# Needs root and debootstrap. Usage: docker/standin_base.sh [cpu|gpu] [ROOTFS_DIR]   (DOCKER_HOST: the engine)
set -euo pipefail
target=cpu
if [[ ${1:-} == cpu || ${1:-} == gpu ]]; then target=$1; shift; fi
rootfs=${1:-/tmp/selfdistill-standin-$target-rootfs}
ubuntu=https://archive.ubuntu.com/ubuntu
if [[ $target == cpu ]]; then
  tag=python:3.11-slim
  [[ -x $rootfs/usr/bin/apt-get ]] || debootstrap --variant=minbase bookworm "$rootfs" >/dev/null
  packages="python3 python3-venv python3-dev ca-certificates"  # python:3.11-slim ships Python.h (pycosat builds)
else
  tag=nvidia/cuda:13.0.0-devel-ubuntu24.04
  if [[ ! -x $rootfs/usr/bin/apt-get ]]; then
    # Debian's debootstrap has no noble script (gutsy's rules fit every Ubuntu release) nor Ubuntu's keyring:
    # the keyring comes from Ubuntu's archive over TLS, then the packages are checked against it.
    keys=$(mktemp -d)
    curl -fsS -o "$keys/k.deb" "$ubuntu/pool/main/u/ubuntu-keyring/ubuntu-keyring_2023.11.28.1_all.deb"
    dpkg-deb -x "$keys/k.deb" "$keys"
    debootstrap --variant=minbase --keyring="$keys/usr/share/keyrings/ubuntu-archive-keyring.gpg" \
      noble "$rootfs" "$ubuntu" /usr/share/debootstrap/scripts/gutsy >/dev/null
    rm -rf "$keys"
  fi
  # The CUDA image's apt sources: plain HTTP like ubuntu:24.04's (apt checks the signatures), universe for ninja-build.
  printf 'deb http://archive.ubuntu.com/ubuntu %s main universe\n' noble noble-updates noble-security \
    >"$rootfs/etc/apt/sources.list"
  packages="ca-certificates"
fi
# minbase has no ca-certificates yet, so the folder is made here; update-ca-certificates adds these below.
mkdir -p "$rootfs/usr/local/share/ca-certificates"
shopt -s nullglob
cas=(/usr/local/share/ca-certificates/*.crt)
(( ${#cas[@]} )) && cp "${cas[@]}" "$rootfs/usr/local/share/ca-certificates/"
cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
chroot "$rootfs" sh -c "apt-get update -q && apt-get install -y -q --no-install-recommends $packages \
  && update-ca-certificates && rm -rf /var/lib/apt/lists/*" >/dev/null
[[ $target == cpu ]] && ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
# pip in a venv trusts certifi's bundle, not the system's: point it at the system bundle (with the proxy's CA).
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$rootfs/etc/pip.conf"
links=${PIP_FIND_LINKS:-}
if [[ $target == cpu && -n $links && -d $links ]]; then
  mkdir -p "$rootfs/opt/wheels" && cp "$links"/*.whl "$rootfs/opt/wheels/"
  printf 'find-links = /opt/wheels\n' >>"$rootfs/etc/pip.conf"
fi
tar -C "$rootfs" -c . | docker import - "$tag" >/dev/null
echo "standin_base.sh: $tag is a local stand-in ($(. "$rootfs/etc/os-release" && echo "$PRETTY_NAME"), \
${#cas[@]} local CA certificates)"
