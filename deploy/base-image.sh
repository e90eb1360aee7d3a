#!/usr/bin/env bash
# Build a Debian bookworm base image with Python 3.11 without any image registry:
#   deploy/base-image.sh [TAG]          (default seedtune-base:bookworm)
# For machines that cannot pull python:3.11-slim. It debootstraps a minimal root file system from
# the Debian mirror this machine's apt already uses and imports it into the local docker daemon.
# Then build with:  BASE_IMAGE=seedtune-base:bookworm docker-compose build
set -euo pipefail
TAG="${1:-seedtune-base:bookworm}"
if docker image inspect "$TAG" >/dev/null 2>&1; then
    echo "base image $TAG already exists"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "base-image: error: debootstrap is missing (apt-get install debootstrap)" >&2; exit 2; }
MIRROR="${DEBIAN_MIRROR:-$(grep -rhoE '^(URIs:|deb) +https?://[^ ]+/debian/?' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
    | grep -oE 'https?://[^ ]+' | grep -v security | head -n1 || true)}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
ROOTFS="$(mktemp -d)"
trap 'rm -rf "$ROOTFS"' EXIT
echo "debootstrap bookworm from $MIRROR (a few minutes)"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    bookworm "$ROOTFS" "$MIRROR" >/dev/null
rm -rf "$ROOTFS"/var/cache/apt/archives/*.deb "$ROOTFS"/var/lib/apt/lists/*
tar -C "$ROOTFS" -c . | docker import --change 'CMD ["/bin/bash"]' - "$TAG" >/dev/null
echo "base image $TAG is ready"
