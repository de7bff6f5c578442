#!/usr/bin/env bash
# A release: one static Linux binary (musl; no glibc, no shared libraries,
# no Rust toolchain needed where it runs), named with its version, with the
# commit it was built from in `larder --version`, as a tarball with its
# sha256. From the repository root, on Debian:
#
#   bash examples/packaging/release.sh            # -> dist/larder-<version>-x86_64-linux-musl.tar.gz
#
# It installs what it needs (the musl target and musl-tools for ring's C
# parts, protoc for the etcd client). Then it checks that the binary is
# static and runs it in an empty root: no file but itself.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
target=x86_64-unknown-linux-musl
sudo=$(command -v sudo || true)
missing=()
command -v musl-gcc >/dev/null || missing+=(musl-tools)
command -v protoc >/dev/null || missing+=(protobuf-compiler)
if ((${#missing[@]})); then
    $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
rustup target add "$target" >/dev/null

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
export LARDER_COMMIT="${LARDER_COMMIT:-$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)}"
CC_x86_64_unknown_linux_musl=musl-gcc cargo build --release --locked --target "$target" --bin larder
binary="target/$target/release/larder"

# Static: no program interpreter, no needed libraries.
if readelf -l "$binary" | grep -q 'Requesting program interpreter'; then
    echo "release: $binary is dynamically linked" >&2
    exit 1
fi
# It runs where nothing else is: an empty directory as its root.
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
cp "$binary" "$root/larder"
if [[ $(id -u) == 0 ]]; then
    chroot "$root" /larder --version
else
    echo "release: not root, skipping the empty-root run" >&2
    "$binary" --version
fi

name="larder-$version-x86_64-linux-musl"
mkdir -p "dist/$name"
cp "$binary" "dist/$name/larder"
cp README.md config.yml examples/packaging/larder.service "dist/$name/"
tar -C dist -czf "dist/$name.tar.gz" "$name"
(cd dist && sha256sum "$name.tar.gz" > "$name.tar.gz.sha256")
echo "release: dist/$name.tar.gz ($(cut -c1-16 < "dist/$name.tar.gz.sha256")…)"
