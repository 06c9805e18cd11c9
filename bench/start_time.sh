#!/usr/bin/env bash
# Cold and warm start of `make run`: clones this repository into a temporary
# folder (nothing set up: no venv, no model, no generated code), runs `make run`
# until the platform says it is ready, stops it, then does it again (warm).
# Prints both times. Uses port 18080 for the edge.
set -euo pipefail
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
git clone -q "$repo" "$work/mariana"
cd "$work/mariana"
for phase in cold warm; do
  log="$work/$phase.log"
  started=$(date +%s.%N)
  setsid env MARIANA_MASTER_KEY=sk-start-time MARIANA_EDGE_PORT=18080 make run >"$log" 2>&1 &
  pid=$!
  until grep -q "Ctrl-C stops everything" "$log" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then echo "$phase start failed:"; tail -20 "$log"; exit 1; fi
    sleep 0.2
  done
  echo "$phase start: $(python3 -c "import sys; print(round(float(sys.argv[1]) - float(sys.argv[2]), 1))" "$(date +%s.%N)" "$started") s"
  kill -TERM -- "-$pid"
  wait "$pid" || true
done
