#!/usr/bin/env bash
# Time the README's commands on a fresh clone, then delete the clone.
#
#   bash bench/fresh_clone.sh [REV] [TARGETS...]     # defaults: HEAD, "install demo test"
#
# Clones this repository at REV into a scratch folder, runs `make <target>` for each target,
# prints each one's wall time and exit status, the demo's held-out line and the test summary,
# and removes the clone on exit, even after a failure or Ctrl-C: a clone holds its own .venv
# (about 6 GB with torch's CUDA build), and leftover clones once filled this machine's disk
# until CI could not install.
set -uo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
rev="${1:-HEAD}"
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(install demo test)

clone="$(mktemp -d "${TMPDIR:-/tmp}/flowalign-fresh.XXXXXX")"
trap 'rm -rf "$clone"' EXIT
git clone -q "$repo" "$clone/repo" && git -C "$clone/repo" checkout -q "$rev" || exit 1
echo "fresh clone of $(git -C "$clone/repo" rev-parse --short HEAD) in $clone/repo"

status=0
for target in "${targets[@]}"; do
    start=$(date +%s)
    (cd "$clone/repo" && make "$target") > "$clone/$target.log" 2>&1
    rc=$?
    secs=$(( $(date +%s) - start ))
    printf 'make %-8s %2d min %02d s  (exit %d)\n' "$target" $((secs / 60)) $((secs % 60)) "$rc"
    case "$target" in
        demo) grep "held-out accuracy" "$clone/$target.log" | tail -1 ;;
        test) grep -E "passed|failed|error" "$clone/$target.log" | tail -1 ;;
    esac
    if [ "$rc" -ne 0 ]; then
        tail -20 "$clone/$target.log"
        status=$rc
        break
    fi
done
exit "$status"
