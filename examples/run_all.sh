#!/usr/bin/env bash
# Runs every example with a time limit and prints ok/FAIL per file; exits non-zero
# if any failed. Skipped: the long-running servers (server.lua, counter.lua,
# supervisor.lua, sticky.lua) and any example with a line "-- run_all: skip" in its first 10 lines.
#   bash examples/run_all.sh            # uses build/ (make), or BUILD=build-ex
#   VERBOSE=1 bash examples/run_all.sh  # show each example's output
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
build=${BUILD:-build}
case $build in /*) ;; *) build="$root/$build" ;; esac
export LUA_PATH_5_4="$root/lua/?.lua;$root/lua/?/init.lua;;"
export LUA_CPATH_5_4="$build/?.so;;"
LUA=${LUA:-lua5.4}
LIMIT=${LIMIT:-20}

if [ ! -f "$build/cluster/core.so" ]; then
  echo "no $build/cluster/core.so: run make first" >&2
  exit 2
fi

failed=0
total=0
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for f in "$here"/*.lua; do
  name=$(basename "$f")
  case $name in server.lua|counter.lua|supervisor.lua|sticky.lua) continue ;; esac
  if head -n 10 "$f" | grep -q -- '-- run_all: skip'; then continue; fi
  total=$((total + 1))
  start=$(date +%s.%N)
  # -k: a master that ignores SIGTERM gets SIGKILL 2 s later; stdin is /dev/null, so
  # that repl.lua reads end of input and ends (at a terminal it would wait for input)
  timeout -k 2 "$LIMIT" "$LUA" "$f" </dev/null >"$out" 2>&1
  rc=$?
  secs=$(printf '%.2f' "$(echo "$(date +%s.%N) - $start" | bc)")
  if [ $rc -eq 0 ]; then
    printf 'ok    %-24s %6ss\n' "$name" "$secs"
    [ -n "${VERBOSE:-}" ] && sed 's/^/      | /' "$out"
  else
    failed=$((failed + 1))
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then why="timed out after ${LIMIT}s"; else why="exit $rc"; fi
    printf 'FAIL  %-24s %6ss  (%s)\n' "$name" "$secs" "$why"
    sed 's/^/      | /' "$out"
  fi
done
echo "$((total - failed))/$total examples passed"
[ $failed -eq 0 ]
