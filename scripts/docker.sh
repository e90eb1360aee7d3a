#!/usr/bin/env bash
# Make sure a docker daemon runs here and a base image for deploy/Dockerfile exists, so that the
# docker-compose test (tests/test_compose.py) can build and run the real stack. Needs root.
#   installs docker.io, docker-compose and debootstrap with apt-get if they are missing;
#   starts dockerd (overlay2, data under /var/lib/seedtune-docker) if none answers;
#   uses python:3.11-slim if it can be pulled, else builds seedtune-base:bookworm offline.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
    echo "docker: installing ${missing[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
    echo "docker: starting dockerd"
    mkdir -p /var/lib/seedtune-docker
    nohup dockerd --storage-driver=overlay2 --data-root /var/lib/seedtune-docker >/var/log/seedtune-dockerd.log 2>&1 &
    for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    docker info >/dev/null 2>&1 || { echo "docker: error: dockerd did not start; see /var/log/seedtune-dockerd.log" >&2; exit 2; }
fi
if docker image inspect python:3.11-slim >/dev/null 2>&1 || timeout 60 docker pull -q python:3.11-slim >/dev/null 2>&1; then
    echo "docker: base image python:3.11-slim"
else
    deploy/base-image.sh seedtune-base:bookworm
fi
