#!/usr/bin/env bash
# Sets up a fresh Debian machine for ovl, idempotently, printing a line per step.
#   packaging/setup-deps.sh           what building and the demo need, then builds
#   packaging/setup-deps.sh --tests   the same plus what only the tests need (pjdfstest)
set -euo pipefail
cd "$(dirname "$0")/.."
tests=0
[ "${1:-}" = --tests ] && tests=1
step() { printf '== setup: %s\n' "$*"; }
if [ "$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi
need=()
# fuse3: fusermount3. libc6-dev: libc.a, for the static bundle runtime. The rest serve tests:
# attr (getfattr/setfattr), busybox-static (a tiny rootfs for --root), strace (crash tests kill
# a commit at chosen system calls), fuse-overlayfs (a reference).
pkgs=(fuse3 libc6-dev)
[ $tests = 1 ] && pkgs+=(fuse-overlayfs attr busybox-static strace)
for pkg in "${pkgs[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  step "installing Debian packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
else
  step "Debian packages present: ${pkgs[*]}"
fi
if [ $tests = 1 ]; then
  if ! command -v pjdfstest >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/pjdfstest" ]; then
    step "installing pjdfstest from crates.io (the POSIX suite the tests run)"
    cargo install --locked pjdfstest
  fi
fi
# Debian's udev rule makes /dev/fuse 0666 so users can mount; containers without udev often
# leave it 0600, which blocks every unprivileged FUSE mount (fusermount3 included).
if [ -c /dev/fuse ] && [ "$(stat -c %a /dev/fuse)" != 666 ]; then
  step "opening /dev/fuse to users (chmod 0666, as udev does)"
  $SUDO chmod 0666 /dev/fuse
fi
step "building ovl and the static bundle runtime ovl-pack carries (cargo build --release)"
cargo build --release
step "done"
