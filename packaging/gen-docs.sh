#!/usr/bin/env bash
# Writes the man pages and shell completions of ovl-run, ovl-mount and ovl-pack under PREFIX
# (default target/docs), generated from the binaries' own command-line definitions:
#   PREFIX/share/man/man1/ovl-run.1 ...
#   PREFIX/share/bash-completion/completions/ovl-run, PREFIX/share/zsh/site-functions/_ovl-run,
#   PREFIX/share/fish/vendor_completions.d/ovl-run.fish
#   packaging/gen-docs.sh [PREFIX]          e.g. packaging/gen-docs.sh ~/.local
# Uses the binaries beside it in target/release, else the ones on PATH (cargo install).
set -euo pipefail
cd "$(dirname "$0")/.."
prefix="${1:-target/docs}"
for b in ovl-run ovl-mount ovl-pack; do
    bin="${CARGO_TARGET_DIR:-target}/release/$b"
    [ -x "$bin" ] || bin="$(command -v "$b")" || { echo "gen-docs.sh: no $b: cargo build --release first" >&2; exit 1; }
    OVL_GENERATE_DOCS="$prefix" "$bin"
done
echo "gen-docs.sh: man pages and completions under $prefix/share"
