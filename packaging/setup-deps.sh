#!/usr/bin/env bash
# Installs what building and testing ovl needs on a fresh Debian machine. Idempotent.
set -euo pipefail
if [ "$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi
need=()
# libc6-dev: libc.a, for the static bundle runtime.
# uidmap: newuidmap/newgidmap, for --root sessions with subordinate ids (tests/ovl_run.rs).
for pkg in fuse3 fuse-overlayfs attr busybox-static strace libc6-dev uidmap; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v pjdfstest >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/pjdfstest" ]; then
  cargo install --quiet --locked pjdfstest
fi
# Debian's udev rule makes /dev/fuse 0666 so users can mount; containers without udev often
# leave it 0600, which blocks every unprivileged FUSE mount (fusermount3 included).
if [ -c /dev/fuse ] && [ "$(stat -c %a /dev/fuse)" != 666 ]; then
  $SUDO chmod 0666 /dev/fuse
fi
cargo build --release --quiet
# The static runtime that heads every app.run bundle.
"$(dirname "$0")/build-runtime.sh" >/dev/null
