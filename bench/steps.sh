#!/usr/bin/env bash
# What each data-path step bought: builds Turnpike at the commit before and after each step
# (git worktrees, one shared release target) and runs coturn's own client against each build,
# client-to-client (-y, same-server short-circuit applies) and client-to-peer (through
# turnutils_peer), in alternating rounds; prints server CPU µs per message per build.
#
#   bench/steps.sh [--rounds N] [--messages N] [--prebuilt DIR]
#
# Defaults: 3 rounds, 1000 messages per client. --prebuilt DIR takes DIR/turnpike-<commit> where it
# exists instead of building that commit (release builds of the same commits, e.g. from an
# earlier run).
#
# Documented in docs/benchmarks.md. Needs coturn's turnutils_uclient/turnutils_peer (Debian
# package coturn; installed when missing, as in compare.sh). Run from the repository root.
set -euo pipefail

ROUNDS=3 N=1000 PREBUILT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS="$2"; shift 2 ;;
    --messages) N="$2"; shift 2 ;;
    --prebuilt) PREBUILT="$2"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "steps.sh: unknown option $1" >&2; exit 1 ;;
  esac
done
cd "$(dirname "$0")/.."
# step label and commit: the first is the baseline, each next one adds one change.
STEPS=(
  "baseline:a86965b"        # one try_recv_from and one send_to per datagram
  "+short-circuit:5b766d9"  # same-server short-circuit between allocations
  "+recvmmsg:3accb00"       # batched receive (eb747ba) and the tidy-ups after it, no new step
  "+sendmmsg:5a32a42"       # batched send per socket run; pooled cross-shard handoff buffers
  "+deferred-flush:cf000bc" # flush once every socket ready in a reactor turn has been read
)
if ! command -v turnutils_uclient >/dev/null || ! command -v turnutils_peer >/dev/null; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y coturn
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/turnpike-steps.XXXXXX")
PID="" PEER=""
cleanup() {
  [ -n "$PID" ] && kill "$PID" 2>/dev/null || true
  [ -n "$PEER" ] && kill "$PEER" 2>/dev/null || true
  for s in "${STEPS[@]}"; do git worktree remove --force "$WORK/src-${s%%:*}" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
for s in "${STEPS[@]}"; do
  label=${s%%:*} commit=${s#*:}
  if [ -n "$PREBUILT" ] && [ -x "$PREBUILT/turnpike-$commit" ]; then
    cp "$PREBUILT/turnpike-$commit" "$WORK/turnpike-$label"
    continue
  fi
  git worktree add -f --detach "$WORK/src-$label" "$commit" > /dev/null
  # A shared target dir judges freshness by mtime: make every build see its own sources as new.
  find "$WORK/src-$label" -name '*.rs' -exec touch {} +
  (cd "$WORK/src-$label" && CARGO_TARGET_DIR="$WORK/target" cargo build --release -p turnpike 2>&1 | tail -1)
  cp "$WORK/target/release/turnpike" "$WORK/turnpike-$label"
done

SECRET=$(head -c 18 /dev/urandom | base64 | tr '+/' '-_')
HZ=$(getconf CLK_TCK)
free_port() {
  python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
RAW="$WORK/raw.tsv"; : > "$RAW"
for round in $(seq "$ROUNDS"); do
  for load in y peer; do
    for s in "${STEPS[@]}"; do
      label=${s%%:*}
      log="$WORK/server.log"
      TURNPIKE_RELAY_LISTEN=udp://127.0.0.1:0 TURNPIKE_ADMIN_LISTEN=127.0.0.1:0 \
      TURNPIKE_RELAY_SECRETS="$SECRET" TURNPIKE_RELAY_USER_QUOTA=100000 \
      TURNPIKE_RELAY_GRACE_PERIOD=0s TURNPIKE_RELAY_RELAY_PORTS=10000-31999 TURNPIKE_LOG_LEVEL=warn \
        "$WORK/turnpike-$label" serve > "$log" 2>&1 &
      PID=$!
      PORT=""
      for _ in $(seq 100); do
        PORT=$(sed -n 's|^turnpike: relay listening on udp://127.0.0.1:||p' "$log" | head -1)
        [ -n "$PORT" ] && break
        sleep 0.05
      done
      [ -n "$PORT" ] || { echo "turnpike $label did not start" >&2; cat "$log" >&2; exit 1; }
      extra=(-y)
      if [ "$load" = peer ]; then
        pp=$(free_port)
        turnutils_peer -p "$pp" -L 127.0.0.1 > /dev/null 2>&1 &
        PEER=$!
        for _ in $(seq 100); do ss -Hlun "sport = :$pp" | grep -q . && break; sleep 0.05; done
        extra=(-e 127.0.0.1 -r "$pp")
      fi
      before=$(cpu_ticks "$PID")
      turnutils_uclient -c "${extra[@]}" -s -m 100 -n "$N" -l 200 -z 1 -W "$SECRET" -u benchuser \
        -p "$PORT" 127.0.0.1 > "$WORK/uc.out" 2>&1 || true
      after=$(cpu_ticks "$PID")
      [ -n "$PEER" ] && { kill "$PEER" 2>/dev/null || true; wait "$PEER" 2>/dev/null || true; PEER=""; }
      kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""
      lost=$(sed -n 's/.*Total lost packets \([0-9]*\).*/\1/p' "$WORK/uc.out" | tail -1)
      us=$(awk -v t=$((after - before)) -v hz="$HZ" -v m=$((100 * N)) 'BEGIN{printf "%.2f", t*1e6/hz/m}')
      printf '%s\t%s\t%s\t%s\t%s\n' "$label" "$load" "$round" "$us" "${lost:-NA}" >> "$RAW"
      echo "  round $round $load $label: $us us/msg, lost ${lost:-NA}" >&2
    done
  done
done
python3 - "$RAW" "$ROUNDS" "$N" <<'PY'
import sys, statistics as st
rows = [l.split("\t") for l in open(sys.argv[1]) if l.strip()]
labels = []
for r in rows:
    if r[0] not in labels: labels.append(r[0])
print(f"Server CPU µs per message, coturn's client, 100 clients × {sys.argv[3]} messages of 200 bytes, "
      f"{sys.argv[2]} rounds (median; rounds; lost packets over all rounds):")
print()
print("| Build | client-to-client (-y) | vs previous | client-to-peer (turnutils_peer) | vs previous |")
print("|---|---|---|---|---|")
prev = {}
for lab in labels:
    cells = []
    for load in ("y", "peer"):
        xs = [float(r[3]) for r in rows if r[0] == lab and r[1] == load]
        lost = sum(int(r[4]) for r in rows if r[0] == lab and r[1] == load and r[4].strip().isdigit())
        m = st.median(xs)
        d = "—" if load not in prev else f"{100 * (m - prev[load]) / prev[load]:+.0f} %"
        prev[load] = m
        cells += [f"{m:.2f} ({', '.join(f'{x:.1f}' for x in xs)}; lost {lost})", d]
    print(f"| {lab} | " + " | ".join(cells) + " |")
PY
