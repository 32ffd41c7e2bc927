#!/usr/bin/env bash
# Build the local Docker images the Docker tests use, without any registry:
#   pipebuild-test:bash          busybox (Debian's busybox-static) + this machine's bash and the
#                                shared libraries it needs, imported with `docker import` (~5 MB).
#   pipebuild-runtime-base:test  Debian bookworm minbase with its python3 (3.11) and pipebuild's
#                                dependencies with the [gcs] extra in /opt/pipebuild/lib (on
#                                PYTHONPATH), but not pipebuild itself: tests/runtime_image.py adds
#                                the current source on top, as pipebuild-runtime:test, every
#                                session. The test stand-in for runtime/Dockerfile. Measured here:
#                                debootstrap ~37 s, pip ~7 s, import ~5 s; 194 MB.
# Needs a running dockerd, /bin/busybox (apt-get install busybox-static), root and debootstrap
# (apt-get install debootstrap), a Debian mirror and a pip that reaches PyPI ($PIP, default
# `python3 -m pip`; it runs on the host and fetches cp311 manylinux wheels for the image).
# Idempotent: builds only the images that are missing, or both when called with --force.
set -euo pipefail
IMAGE=pipebuild-test:bash
BASE_IMAGE=pipebuild-runtime-base:test
FORCE=${1:-}
missing() { [ "$FORCE" = --force ] || ! docker image inspect "$1" >/dev/null 2>&1; }
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT

if missing "$IMAGE"; then
  BUSYBOX=$(command -v busybox || true)
  [ -n "$BUSYBOX" ] || { echo "build_test_images.sh: busybox not found (apt-get install busybox-static)" >&2; exit 1; }
  R=$W/root
  mkdir -p "$R/bin" "$R/tmp" "$R/etc"
  chmod 1777 "$R/tmp"
  cp "$BUSYBOX" "$R/bin/busybox"
  for a in $("$R/bin/busybox" --list); do
    [ "$a" = busybox ] || [ "$a" = bash ] || ln -sf busybox "$R/bin/$a"
  done
  BASH_BIN=$(command -v bash)
  cp "$BASH_BIN" "$R/bin/bash"
  for lib in $({ ldd "$BASH_BIN"; ldd "$BUSYBOX" 2>/dev/null || true; } | grep -o '/[^ ]*' | sort -u); do
    mkdir -p "$R$(dirname "$lib")"
    cp -L "$lib" "$R$lib"
  done
  echo "root:x:0:0:root:/:/bin/sh" >"$R/etc/passwd"
  tar -C "$R" -c . | docker import - "$IMAGE" >/dev/null
  echo "built $IMAGE"
fi

if missing "$BASE_IMAGE"; then
  command -v debootstrap >/dev/null || { echo "build_test_images.sh: debootstrap not found (apt-get install debootstrap)" >&2; exit 1; }
  cd "$(dirname "$0")/.."
  # The Debian mirror this machine's apt already uses (a one-line `deb` entry or deb822 URIs).
  MIRROR=${DEBIAN_MIRROR:-$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '$1=="deb"{print $2; exit}' || true)}
  [ -n "$MIRROR" ] || MIRROR=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '$1=="URIs:"{print $2; exit}' || true)
  [ -n "$MIRROR" ] || MIRROR=http://deb.debian.org/debian
  R=$W/runtime
  debootstrap --variant=minbase --include=python3 bookworm "$R" "$MIRROR" >"$W/debootstrap.log" 2>&1 \
    || { tail -20 "$W/debootstrap.log" >&2; echo "build_test_images.sh: debootstrap failed" >&2; exit 1; }
  # The apt lists and .debs, docs, man pages and translations are ~130 MB the stager never reads.
  rm -rf "$R/var/cache/apt/"*.bin "$R/var/cache/apt/archives/"*.deb "$R/var/lib/apt/lists/"* \
    "$R/usr/share/doc" "$R/usr/share/man" "$R/usr/share/locale" "$R/usr/share/info"
  # pipebuild's dependencies and its [gcs] extra, read from pyproject.toml so they stay in step.
  mapfile -t DEPS < <(python3 -c 'import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
print("\n".join(p["dependencies"] + p["optional-dependencies"]["gcs"]))')
  # The host's pip fills the image's library directory with wheels for bookworm's CPython 3.11.
  ${PIP:-python3 -m pip} install --quiet --no-warn-conflicts --target "$R/opt/pipebuild/lib" \
    --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    "${DEPS[@]}" >"$W/pip.log" 2>&1 \
    || { tail -20 "$W/pip.log" >&2; echo "build_test_images.sh: pip install failed" >&2; exit 1; }
  rm -rf "$R/opt/pipebuild/lib/bin"
  tar -C "$R" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PYTHONPATH=/opt/pipebuild/lib' \
    --change 'ENV PYTHONUNBUFFERED=1' \
    --change 'CMD ["python3"]' \
    - "$BASE_IMAGE" >/dev/null
  echo "built $BASE_IMAGE"
fi
