#!/usr/bin/env bash
# A Debian bookworm base image with Python 3.11, made from the Debian mirror
# alone (no container registry): debootstrap, trim, `docker import`.
#
#   deploy/docker/base.sh [TAG]          (default TAG: gateway-base:bookworm; as root)
#
# The root file system is cached as a tarball in $GATEWAY_DOCKER_CACHE
# (default /var/cache/gateway-docker), so a second run only imports it;
# GATEWAY_BASE_REFRESH=1 bootstraps again. The mirror is $DEBIAN_MIRROR
# (default http://deb.debian.org/debian). Needs debootstrap and a Docker engine.
set -euo pipefail
tag="${1:-gateway-base:bookworm}"
cache="${GATEWAY_DOCKER_CACHE:-/var/cache/gateway-docker}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
tarball="$cache/bookworm-python3.tar"

if [ "$(id -u)" -ne 0 ]; then
  echo "base.sh: debootstrap needs root" >&2
  exit 2
fi
mkdir -p "$cache"
if [ ! -s "$tarball" ] || [ "${GATEWAY_BASE_REFRESH:-}" = 1 ]; then
  command -v debootstrap >/dev/null || { echo "base.sh: debootstrap is not installed" >&2; exit 2; }
  root="$(mktemp -d "$cache/rootfs.XXXXXX")"
  trap 'rm -rf "$root"' EXIT
  echo "base.sh: debootstrap bookworm from $mirror (about a minute)" >&2
  debootstrap --variant=minbase --include=python3,python3-venv bookworm "$root" "$mirror" \
    >"$cache/debootstrap.log" 2>&1 || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
  # What an image needs none of: package caches and lists, docs, man pages, locales.
  chroot "$root" apt-get clean
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
    "$root"/usr/share/locale/* "$root"/var/log/*.log "$root"/var/log/apt/* \
    "$root"/tmp/* "$root"/root/.cache
  "$root"/usr/bin/python3 -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version'
  tar --numeric-owner --xattrs -C "$root" -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
fi
docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  "$tarball" "$tag" >/dev/null
echo "base.sh: $tag ($(docker image inspect -f '{{.Size}}' "$tag") bytes)" >&2
