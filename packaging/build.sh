#!/usr/bin/env bash
# Build meshd's release artifacts into dist/:
#   dist/meshd-VERSION-ARCH-linux.tar.gz   static (musl), stripped meshd and meshctl, the unit,
#                                          man pages, completions, README, LICENSE, CHANGELOG
#   dist/meshd_VERSION-1_DEBARCH.deb       the same as a Debian package
# for ARCH in x86_64 and aarch64 (cross-linked with gcc-aarch64-linux-gnu).
#
# Needs (Debian): musl-tools gcc-aarch64-linux-gnu libc6-dev-arm64-cross dpkg-dev, and
#   rustup target add x86_64-unknown-linux-musl aarch64-unknown-linux-musl
# Usage: packaging/build.sh [ARCH...]   (default: x86_64 aarch64)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
MESHD_COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
export MESHD_COMMIT
# The shipped binaries are stripped, so the release profile's debug info (kept for profiling
# local builds) would only cost disk and link time here.
export CARGO_PROFILE_RELEASE_DEBUG=0
if [ $# -gt 0 ]; then ARCHS=("$@"); else ARCHS=(x86_64 aarch64); fi
# This machine's own architecture first: its binaries make the man pages and completions.
host=$(uname -m)
ordered=("$host")
for a in "${ARCHS[@]}"; do [ "$a" = "$host" ] || ordered+=("$a"); done
ARCHS=("${ordered[@]}")
DIST=$PWD/dist
mkdir -p "$DIST"

for arch in "${ARCHS[@]}"; do
  target=$arch-unknown-linux-musl
  case $arch in
    x86_64) debarch=amd64; strip=strip ;;
    aarch64)
      debarch=arm64; strip=aarch64-linux-gnu-strip
      export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_MUSL_LINKER=aarch64-linux-gnu-gcc
      export CC_aarch64_unknown_linux_musl=aarch64-linux-gnu-gcc
      export AR_aarch64_unknown_linux_musl=aarch64-linux-gnu-ar
      ;;
    *) echo "unknown architecture $arch (x86_64 or aarch64)" >&2; exit 1 ;;
  esac
  echo "== $target"
  cargo build --release --locked --target "$target" --bin meshd --bin meshctl
  stage=$(mktemp -d)
  trap 'rm -rf "$stage"' EXIT
  bin=$stage/bin; mkdir -p "$bin"
  for b in meshd meshctl; do
    install -m 0755 "target/$target/release/$b" "$bin/$b"
    # Debug info stays out of the shipped binary.
    "$strip" --strip-all "$bin/$b"
  done
  # Man pages and completions come from the clap definitions (the same for every
  # architecture), made by the binaries of this machine's own architecture, built first.
  gen=target/$(uname -m)-unknown-linux-musl/release
  "$gen/meshd" manpages "$stage/man" >/dev/null
  mkdir -p "$stage/completions"
  for b in meshd meshctl; do
    for sh in bash zsh fish; do
      "$gen/$b" completions $sh > "$stage/completions/$b.$sh"
    done
  done

  # The tarball.
  name=meshd-$VERSION-$arch-linux
  tree=$stage/$name; mkdir -p "$tree"
  cp "$bin/meshd" "$bin/meshctl" README.md LICENSE CHANGELOG.md packaging/meshd.service "$tree/"
  cp -r "$stage/man" "$stage/completions" "$tree/"
  tar -C "$stage" --owner=0 --group=0 -czf "$DIST/$name.tar.gz" "$name"

  # The .deb.
  root=$stage/deb
  install -D -m 0755 "$bin/meshd" "$root/usr/bin/meshd"
  install -D -m 0755 "$bin/meshctl" "$root/usr/bin/meshctl"
  install -D -m 0644 packaging/meshd.service "$root/usr/lib/systemd/system/meshd.service"
  sed -i 's|/usr/local/bin/meshd|/usr/bin/meshd|' "$root/usr/lib/systemd/system/meshd.service"
  install -d "$root/usr/share/man/man1"
  for m in "$stage"/man/*.1; do gzip -9n < "$m" > "$root/usr/share/man/man1/$(basename "$m").gz"; done
  install -D -m 0644 "$stage/completions/meshd.bash" "$root/usr/share/bash-completion/completions/meshd"
  install -D -m 0644 "$stage/completions/meshctl.bash" "$root/usr/share/bash-completion/completions/meshctl"
  install -D -m 0644 "$stage/completions/meshd.zsh" "$root/usr/share/zsh/vendor-completions/_meshd"
  install -D -m 0644 "$stage/completions/meshctl.zsh" "$root/usr/share/zsh/vendor-completions/_meshctl"
  install -D -m 0644 "$stage/completions/meshd.fish" "$root/usr/share/fish/vendor_completions.d/meshd.fish"
  install -D -m 0644 "$stage/completions/meshctl.fish" "$root/usr/share/fish/vendor_completions.d/meshctl.fish"
  doc=$root/usr/share/doc/meshd; install -d "$doc"
  gzip -9n < README.md > "$doc/README.md.gz"
  gzip -9n < CHANGELOG.md > "$doc/changelog.gz"
  {
    echo "meshd ($VERSION-1) unstable; urgency=medium"
    echo
    echo "  * Release $VERSION (commit $MESHD_COMMIT); see changelog.gz."
    echo
    echo " -- meshd developers <meshd@example.org>  $(date -R -d @"$(git log -1 --format=%ct 2>/dev/null || date +%s)")"
  } | gzip -9n > "$doc/changelog.Debian.gz"
  cat > "$doc/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: meshd
Source: https://example.org/meshd

Files: *
Copyright: 2026 meshd developers
License: Apache-2.0

License: Apache-2.0
 On Debian systems, the complete text of the Apache License 2.0 is in
 /usr/share/common-licenses/Apache-2.0.
COPYRIGHT
  # Static on purpose: one binary for every Linux of the architecture, no libc needed.
  install -d "$root/usr/share/lintian/overrides"
  {
    for b in meshd meshctl; do
      echo "meshd: statically-linked-binary [usr/bin/$b]"
      echo "meshd: shared-library-lacks-prerequisites [usr/bin/$b]"
    done
  } > "$root/usr/share/lintian/overrides/meshd"
  install -d "$root/DEBIAN"
  size=$(du -sk "$root" | cut -f1)
  cat > "$root/DEBIAN/control" <<CONTROL
Package: meshd
Version: $VERSION-1
Architecture: $debarch
Maintainer: meshd developers <meshd@example.org>
Installed-Size: $size
Section: net
Priority: optional
Homepage: https://example.org/meshd
Description: self-hosted mesh VPN with no central server
 meshd joins a fleet of Linux machines into one private encrypted network:
 userspace WireGuard tunnels, gossip membership, mesh DNS, a TLS gateway by
 SNI, a SOCKS5/HTTP proxy with exit nodes, NAT traversal and member relays.
 Static binaries: no dependencies.
CONTROL
  cat > "$root/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
  # Members of this group may read the node's state through the control socket.
  getent group meshd >/dev/null || addgroup --system meshd >/dev/null
  if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
fi
POSTINST
  cat > "$root/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
  systemctl stop meshd.service || true
fi
PRERM
  cat > "$root/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
# The node's state (/var/lib/meshd: its identity, and a mesh's root key) is never removed
# here: `meshd leave` first, then delete it by hand if that is what you want.
POSTRM
  chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"
  (cd "$root" && find usr -type f -exec md5sum {} + > DEBIAN/md5sums)
  dpkg-deb --root-owner-group -Zxz --build "$root" "$DIST/meshd_${VERSION}-1_${debarch}.deb" >/dev/null
  rm -rf "$stage"; trap - EXIT
  echo "built $DIST/$name.tar.gz and $DIST/meshd_${VERSION}-1_${debarch}.deb"
done
