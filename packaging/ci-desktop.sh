#!/usr/bin/env bash
# CI for the desktop parts (issue 6): installs what the tray needs from Debian, then
# builds, lints and tests with `--features tray` (the tray's end-to-end test under Xvfb
# with trayer as the panel) and builds the .deb. The lead's .ci/run calls this after the
# ordinary build and tests without the feature.
#
# Set FERRY_CI_DESKTOP_FULL=1 to run the whole test suite with the feature, not only the
# tray's tests, and FERRY_CI_SKIP_DEB=1 to skip the package (a release build, plus a few
# minutes to install cargo-deb on a fresh machine).
set -euo pipefail
cd "$(dirname "$0")/.."

# Build: GTK 3, libxdo, AppIndicator. Test: an X server, a tray host, screenshots,
# clipboard. Package: cargo-deb (or dpkg-deb).
pkgs=(libgtk-3-dev libxdo-dev libayatana-appindicator3-dev pkg-config
      xvfb trayer imagemagick xdotool xclip x11-utils dpkg-dev)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "== apt-get install ${missing[*]}"
    sudo_=""
    [ "$(id -u)" -eq 0 ] || sudo_="sudo"
    $sudo_ apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

echo "== build and lint with --features tray"
cargo build --locked --features tray
cargo clippy --locked --all-targets --features tray -- -D warnings

echo "== tests with --features tray"
if [ "${FERRY_CI_DESKTOP_FULL:-0}" = 1 ]; then
    cargo test --locked --features tray
else
    cargo test --locked --features tray --lib -- tray_model autostart
    cargo test --locked --features tray --test e2e -- desktop
fi
ls -l target/tray-screenshots/ 2>/dev/null || true

if [ "${FERRY_CI_SKIP_DEB:-0}" = 1 ]; then
    echo "desktop CI: ok (package skipped)"
    exit 0
fi

echo "== Debian package"
if [ -z "${FERRY_DEB_WITH_DPKG:-}" ] && ! cargo deb --version >/dev/null 2>&1; then
    # A few minutes of compiling; packaging/build-deb.sh falls back to dpkg-deb if it fails.
    cargo install cargo-deb --locked || echo "cargo-deb could not be installed; using dpkg-deb"
fi
deb=$(packaging/build-deb.sh)
echo "built $deb"
# Listed once into a variable: `dpkg -c | grep -q` under pipefail fails at random (grep
# stops at the first match, dpkg-deb's tar dies of SIGPIPE, the pipeline reports that).
listing=$(dpkg -c "$deb")
echo "$listing"
for f in ./usr/bin/ferry ./usr/share/applications/ferry.desktop \
         ./usr/lib/systemd/user/ferry.service \
         ./usr/share/icons/hicolor/256x256/apps/ferry.png; do
    grep -q " $f\$" <<<"$listing" || { echo "missing from the package: $f"; exit 1; }
done
echo "desktop CI: ok"
