#!/bin/sh
# podman with ovl-mount as its overlay mount_program: import a busybox image from a local
# tarball (no registry), run a container that writes, build an image whose RUN steps write,
# delete (a whiteout) and replace a directory (an opaque one), and run the result.
#   podman-smoke.sh OVL_MOUNT DIR      (DIR: an empty directory this user owns)
# Run by tests/podman.rs as root and as a normal user (rootless). Prints what it checks.
set -eu
OVL=$1
D=$2
export HOME="$D/home" XDG_RUNTIME_DIR="$D/xdg" CONTAINERS_STORAGE_CONF="$D/storage.conf"
mkdir -p "$HOME" "$XDG_RUNTIME_DIR" "$D/rootfs/bin" "$D/rootfs/etc" "$D/rootfs/tmp" "$D/ctx"
chmod 700 "$XDG_RUNTIME_DIR"
# Rootless podman leaves a pause process (and its namespaces) running for good: end it with us.
trap 'p=$(cat "$XDG_RUNTIME_DIR/libpod/tmp/pause.pid" 2>/dev/null) && kill "$p" 2>/dev/null; true' EXIT
cat >"$CONTAINERS_STORAGE_CONF" <<EOF
[storage]
driver = "overlay"
graphroot = "$D/graph"
runroot = "$D/run"
[storage.options.overlay]
mount_program = "$OVL"
EOF

# A minimal image: static busybox and its applets.
cp /bin/busybox "$D/rootfs/bin/busybox"
for a in $("$D/rootfs/bin/busybox" --list); do
  [ "$a" = busybox ] || ln -s busybox "$D/rootfs/bin/$a"
done
echo "root:x:0:0:root:/root:/bin/sh" >"$D/rootfs/etc/passwd"
echo "root:x:0:" >"$D/rootfs/etc/group"
tar -C "$D/rootfs" -cf "$D/rootfs.tar" .

# This machine's limits are lower than podman's defaults, which crun may not raise.
LIMITS="--ulimit nofile=$(ulimit -n):$(ulimit -n) --ulimit nproc=1024:1024"
RUN="podman run --rm --pull=never --network none --cgroups=disabled $LIMITS"

podman import -q "$D/rootfs.tar" localhost/ovl-smoke >/dev/null
echo "run: $($RUN localhost/ovl-smoke sh -c 'echo written >/tmp/x && cat /tmp/x')"
echo "root fs: $($RUN localhost/ovl-smoke sh -c 'grep " / / " /proc/self/mountinfo | sed "s/.* - //" | cut -d" " -f1')"

cat >"$D/ctx/Containerfile" <<'EOF'
FROM localhost/ovl-smoke
RUN mkdir -p /data /opt/d && echo built >/data/f && touch /opt/d/old
RUN rm /bin/vi && rm -r /opt/d && mkdir /opt/d && echo new >/opt/d/only
EOF
# Chroot isolation: crun's build path sets RLIMIT_MEMLOCK, which some sandboxes refuse.
podman build -q --isolation chroot -t localhost/ovl-smoke-built "$D/ctx" >/dev/null
echo "built: $($RUN localhost/ovl-smoke-built sh -c 'cat /data/f; ls /opt/d; ls /bin/vi 2>/dev/null || echo vi-gone' | tr '\n' ' ')"
podman rmi -f localhost/ovl-smoke-built localhost/ovl-smoke >/dev/null
