#!/usr/bin/env bash
# Demo: run a command inside an overlay of examples/demo-lower with ovl-run, then show where
# its changes landed; then the same with --on-exit commit on a scratch copy of the lower.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/ovl-run
[ -x "$bin" ] || cargo build --release --quiet
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export XDG_CACHE_HOME="$tmp/cache"

echo "== ovl-run: a command changes the tree; the lower stays as it was"
"$bin" --lower examples/demo-lower --upper "$tmp/upper" -- sh -c '
  app/run.sh
  cat etc/greeting
  echo "changed in the overlay" > etc/greeting
  rm app/run.sh
  mkdir -p new && echo data > new/file
  echo "inside: $(cat etc/greeting); app/ holds: $(ls app)"'
echo "== upper layer (kernel overlayfs format: c 0,0 is a whiteout)"
ls -lR "$tmp/upper"
echo "== lower untouched: $(cat examples/demo-lower/etc/greeting); app/ holds: $(ls examples/demo-lower/app)"

echo "== ovl-run --on-exit commit on a scratch copy of the lower"
cp -a examples/demo-lower "$tmp/lower"
"$bin" --lower "$tmp/lower" --on-exit commit -- sh -c 'echo committed > etc/greeting; rm -r app'
echo "lower now: $(cat "$tmp/lower/etc/greeting"); entries: $(ls "$tmp/lower")"

echo "== app.run: a single-file bundle of packaging/examples/notes, with its own writable layer"
export XDG_DATA_HOME="$tmp/data"
packaging/build-example.sh "$tmp/notes.run" >/dev/null 2>&1
"$tmp/notes.run" add "first note"
"$tmp/notes.run" add "second note"
"$tmp/notes.run" list                        # both notes: the state is kept between runs
"$tmp/notes.run" --ovl-on-exit=discard clear # this run's change is thrown away...
"$tmp/notes.run" --ovl-on-exit=commit list   # ...so both are still there; commit folds them into the file
echo "bundle id after commit: $("$tmp/notes.run" --ovl-info | sed -n 's/^id: *//p')"
