#!/usr/bin/env bash
# Build the local Docker image the Docker tests use, without any registry:
#   pipebuild-test:bash  busybox (Debian's busybox-static) + this machine's bash and the
#                        shared libraries it needs, imported with `docker import` (~5 MB).
# Needs a running dockerd and /bin/busybox (apt-get install busybox-static). Idempotent:
# does nothing when the image exists, unless called with --force.
set -euo pipefail
IMAGE=pipebuild-test:bash
if [ "${1:-}" != --force ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
  exit 0
fi
BUSYBOX=$(command -v busybox || true)
[ -n "$BUSYBOX" ] || { echo "build_test_images.sh: busybox not found (apt-get install busybox-static)" >&2; exit 1; }
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
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
