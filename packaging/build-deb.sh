#!/usr/bin/env bash
# Builds the Debian package: with `cargo deb` when cargo-deb is installed (it reads
# [package.metadata.deb] in Cargo.toml), otherwise the same files with dpkg-deb alone.
# Prints the path of the .deb. Run from anywhere in the repository. FERRY_DEB_WITH_DPKG=1
# takes the dpkg-deb path even where cargo-deb is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${FERRY_DEB_WITH_DPKG:-}" ] && cargo deb --version >/dev/null 2>&1; then
    cargo deb --locked --strip "$@" | tail -n 1
    exit 0
fi

echo "cargo-deb not found: building the package with dpkg-deb" >&2
cargo build --release --locked --features tray >&2
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
arch=$(dpkg --print-architecture)
target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
out="$target_dir/debian"
root="$out/ferry-root"
rm -rf "$root"
mkdir -p "$root/DEBIAN"

install -Dm755 "$target_dir/release/ferry" "$root/usr/bin/ferry"
strip --strip-debug "$root/usr/bin/ferry" 2>/dev/null || true
install -Dm644 packaging/linux/ferry.desktop "$root/usr/share/applications/ferry.desktop"
install -Dm644 packaging/systemd/ferry.service "$root/usr/lib/systemd/user/ferry.service"
for s in 16 32 48 64 128 256; do
    install -Dm644 "packaging/icons/hicolor/${s}x${s}/apps/ferry.png" \
        "$root/usr/share/icons/hicolor/${s}x${s}/apps/ferry.png"
done
install -Dm644 packaging/README-desktop.md "$root/usr/share/doc/ferry/README-desktop.md"

# Shared-library dependencies, as cargo-deb's "$auto" computes them.
depends=""
if command -v dpkg-shlibdeps >/dev/null; then
    mkdir -p "$out/shlibdeps/debian"
    touch "$out/shlibdeps/debian/control"
    depends=$(cd "$out/shlibdeps" && dpkg-shlibdeps -O "$root/usr/bin/ferry" 2>/dev/null \
        | sed -n 's/^shlibs:Depends=//p')
fi
depends="${depends:+$depends, }libayatana-appindicator3-1 | libappindicator3-1"

cat > "$root/DEBIAN/control" <<CONTROL
Package: ferry
Version: ${version}-1
Architecture: ${arch}
Maintainer: Ferry developers <ferry@localhost>
Section: net
Priority: optional
Depends: ${depends}
Recommends: xdg-utils
Installed-Size: $(du -sk "$root" | cut -f1)
Description: Peer-to-peer folder synchronization
 Ferry keeps folders identical across your devices, peer to peer, with no server in
 the middle. This package has the ferry command, its tray icon (ferry tray), a
 launcher entry and a systemd user unit for headless machines
 (systemctl --user enable --now ferry).
CONTROL

deb="$out/ferry_${version}-1_${arch}.deb"
dpkg-deb --root-owner-group --build "$root" "$deb" >&2
echo "$deb"
