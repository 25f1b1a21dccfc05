#!/usr/bin/env bash
# Check the artifacts packaging/build.sh made in dist/: the static binaries run in an empty
# root (chroot) and, for aarch64, under qemu-aarch64-static; each .deb holds what it must and
# lintian reports no errors; `--version` names the commit.
# Needs (Debian): lintian qemu-user-static dpkg. Run as root (chroot).
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
COMMIT=$(git rev-parse --short=12 HEAD)
fail() { echo "check failed: $*" >&2; exit 1; }
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT

for arch in x86_64 aarch64; do
  tgz=dist/meshd-$VERSION-$arch-linux.tar.gz
  [ -f "$tgz" ] || fail "$tgz missing"
  tar -C "$work" -xzf "$tgz"
  dir=$work/meshd-$VERSION-$arch-linux
  for f in meshd meshctl README.md LICENSE CHANGELOG.md meshd.service man/meshd.1 man/meshctl.1 completions/meshctl.bash; do
    [ -e "$dir/$f" ] || fail "$tgz lacks $f"
  done
  file "$dir/meshd" | grep -Eq "statically linked|static-pie linked" || fail "$arch meshd is not static: $(file "$dir/meshd")"
  file "$dir/meshd" | grep -q "not stripped" && fail "$arch meshd is not stripped"
  if [ "$arch" = "$(uname -m)" ]; then
    # An empty root: no libc, no /proc, nothing but the binary.
    root=$work/root-$arch; mkdir -p "$root"
    cp "$dir/meshd" "$dir/meshctl" "$root/"
    out=$(chroot "$root" /meshd --version)
    out2=$(chroot "$root" /meshctl --version)
  else
    out=$(qemu-$arch-static "$dir/meshd" --version)
    out2=$(qemu-$arch-static "$dir/meshctl" --version)
  fi
  echo "$arch: $out; $out2"
  [[ $out == *"$VERSION ($COMMIT"* ]] || fail "$arch meshd --version does not name $COMMIT: $out"
  [[ $out2 == *"$VERSION ($COMMIT"* ]] || fail "$arch meshctl --version does not name $COMMIT: $out2"
done

for debarch in amd64 arm64; do
  deb=dist/meshd_${VERSION}-1_${debarch}.deb
  [ -f "$deb" ] || fail "$deb missing"
  list=$(dpkg-deb -c "$deb")
  for f in ./usr/bin/meshd ./usr/bin/meshctl ./usr/lib/systemd/system/meshd.service \
           ./usr/share/man/man1/meshd.1.gz ./usr/share/man/man1/meshctl-status.1.gz \
           ./usr/share/bash-completion/completions/meshctl ./usr/share/zsh/vendor-completions/_meshd \
           ./usr/share/doc/meshd/README.md.gz ./usr/share/doc/meshd/copyright \
           ./usr/share/doc/meshd/changelog.gz; do
    grep -q " $f\$" <<<"$list" || fail "$deb lacks $f"
  done
  # Errors fail the check; warnings are printed.
  lintian --no-tag-display-limit "$deb" | tee "$work/lintian.txt" || true
  if grep -q '^E:' "$work/lintian.txt"; then fail "lintian errors in $deb"; fi
done
echo "artifacts ok"
