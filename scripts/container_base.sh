#!/usr/bin/env bash
# Makes a base for docker/Dockerfile where no image registry can be pulled from: Debian bookworm (its Python
# is 3.11; with its headers, which torch's inductor compiles against) from a Debian mirror with debootstrap,
# imported as $IMAGE. The host's CA certificates, pip settings
# and local wheel directories (PIP_FIND_LINKS) go in too, so pip in the build reaches what pip here reaches.
# Root, debootstrap and podman (or docker) needed. Then: BASE=$IMAGE bash scripts/build_images.sh
set -euo pipefail
IMAGE=${IMAGE:-localhost/timeshare-base:bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
say() { echo "[base] $*"; }

tool=$(command -v podman || command -v docker || true)
[ -n "$tool" ] || { say "need podman or docker to import the root filesystem"; exit 1; }
command -v debootstrap >/dev/null || { say "need debootstrap (apt-get install debootstrap)"; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs
say "debootstrap bookworm from $MIRROR"
debootstrap --variant=minbase --include=python3,python3-venv,python3-dev,ca-certificates bookworm "$root" "$MIRROR" \
  >"$work/debootstrap.log" 2>&1 || { tail -n 20 "$work/debootstrap.log"; exit 1; }
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
[ -f /etc/pip.conf ] && cp /etc/pip.conf "$root/etc/pip.conf"
links=()
for dir in ${PIP_FIND_LINKS:-}; do
  [ -d "$dir" ] && mkdir -p "$root$dir" && cp -r "$dir/." "$root$dir/" && links+=("$dir")
done
say "importing it as $IMAGE"
tar -C "$root" --numeric-owner -c . | "$tool" import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' --change "ENV PIP_FIND_LINKS=${links[*]}" \
  --change 'CMD ["/bin/bash"]' - "$IMAGE" >/dev/null
say "done: $IMAGE"
