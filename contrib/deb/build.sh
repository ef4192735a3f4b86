#!/usr/bin/env bash
# Builds the Debian package: the release binary, then the files generated from it (man
# pages from `keepfs man`, shell completions from `keepfs completion`) into
# contrib/deb/generated/, then `cargo deb` (cargo install --locked cargo-deb). Prints
# the path of the .deb on its last line.
set -euo pipefail
cd "$(dirname "$0")/../.."
target=${CARGO_TARGET_DIR:-target}
cargo build --release --locked --bin keepfs
bin="$target/release/keepfs"
gen=contrib/deb/generated
rm -rf "$gen"
mkdir -p "$gen/man" "$gen/completions"
"$bin" man "$gen/man" >/dev/null 2>&1
gzip -9n "$gen"/man/*.1
"$bin" completion bash >"$gen/completions/keepfs"
"$bin" completion zsh >"$gen/completions/_keepfs"
"$bin" completion fish >"$gen/completions/keepfs.fish"
cargo deb --no-build --strip --output "$target/debian/" >/dev/null
ls -t "$target"/debian/keepfs_*.deb | head -n 1
