#!/usr/bin/env bash
# Side-by-side benchmark: Turnpike against coturn, same machine, loopback, same loads.
#
#   bench/compare.sh [--rounds N] [--quick] [--no-memory] [--only-forwarder]
#
# Installs coturn (Debian package) when turnserver/turnutils_uclient are missing, builds
# turnpike and turnpike-load in release mode, then for every round and every load starts each
# server fresh (Turnpike first, then coturn: A B A B ...), reads the server's CPU time
# (utime + stime, /proc/PID/stat fields 14 and 15) just before and just after the load, and stops
# it. Loads: coturn's own client, client-to-client (-y) and client-to-peer (through coturn's
# turnutils_peer echo peer); turnpike-load client-to-client and client-to-peer at an even
# 20 000 msg/s, client-to-peer in 10 ms ticks, client-to-peer in the shape of coturn's client
# (29 000 msg/s in 4 ms ticks, spread over the allocations, and again with coturn's client's
# grouping: 4 back to back per allocation), and video-like frames (10 flows, 20 packets of 1 000 bytes per
# flow every 10 ms); find-max. The turnpike-load client-to-peer loads
# also run against turnpike-forward, the bare one-recv-one-send UDP forwarder (turnpike-load
# --mode raw-to-peer), as the baseline, and against Turnpike with one shard as well (the
# forwarder is one thread; the default is one shard per core). --only-forwarder runs just those
# against Turnpike and the forwarder (no coturn, no memory). Writes a
# markdown table to stdout and to bench/results-<date>.md (-2, -3 ... for later runs that day).
# TURNPIKE_* variables in the environment reach the Turnpike server and are named in the
# report. Documented in docs/benchmarks.md.
# Run from the repository root.
set -euo pipefail

ROUNDS=3
QUICK=0
MEMORY=1
ONLY_FWD=0
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS="$2"; shift 2 ;;
    --quick) QUICK=1; ROUNDS=1; shift ;;
    --no-memory) MEMORY=0; shift ;;
    --only-forwarder) ONLY_FWD=1; MEMORY=0; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "compare.sh: unknown option $1" >&2; exit 1 ;;
  esac
done

cd "$(dirname "$0")/.."
[ -f Cargo.toml ] || { echo "compare.sh: run from the turnpike repository" >&2; exit 1; }

# ---------------------------------------------------------------- setup
if [ "$ONLY_FWD" = 0 ] && { ! command -v turnserver >/dev/null || ! command -v turnutils_uclient >/dev/null; }; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y coturn
fi
cargo build --release -p turnpike -p turnpike-load

TP=./target/release/turnpike
LOAD=./target/release/turnpike-load
FWD=./target/release/turnpike-forward
HZ=$(getconf CLK_TCK)
DATE=$(date -u +%Y-%m-%d)
# One file per run: a second run on the same day must not overwrite a recorded one.
OUT="bench/results-$DATE.md"
n=2
while [ -e "$OUT" ]; do OUT="bench/results-$DATE-$n.md"; n=$((n + 1)); done
WORK=$(mktemp -d "${TMPDIR:-/tmp}/turnpike-bench.XXXXXX")
RAW="$WORK/raw.tsv"      # server load round cpu_us messages lost loss_pct p99_us max_rate limit extra
: > "$RAW"
# Relay ports: the same range for both servers, below the kernel's ephemeral range
# (net.ipv4.ip_local_port_range, 32768-60999 here), so turnpike-load's echo peer and client
# sockets never compete with relay ports.
RELAY_MIN=10000 RELAY_MAX=31999
SECRET=$(head -c 18 /dev/urandom | base64 | tr '+/' '-_')

if [ "$QUICK" = 1 ]; then
  UC_N=300; DUR=2s; STEP=1s; MAXSTEPS=10; DRAIN=0.5s
else
  UC_N=2000; DUR=5s; STEP=2s; MAXSTEPS=14; DRAIN=0.5s
fi
UC_MSGS=$((100 * UC_N))

SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# Starts a server fresh; sets SERVER_PID and PORT.
start_server() {
  local server=$1 log="$WORK/$1.log"
  case "$server" in
    turnpike|turnpike1)
      # turnpike1: one shard, as many threads as the forwarder (see the forwarder loads below);
      # turnpike: the default (one shard per core) or the caller's TURNPIKE_RELAY_THREADS.
      local one=()
      [ "$server" = turnpike1 ] && one=(TURNPIKE_RELAY_THREADS=1)
      env "${one[@]}" \
      TURNPIKE_RELAY_LISTEN=udp://127.0.0.1:0 TURNPIKE_ADMIN_LISTEN=127.0.0.1:0 TURNPIKE_CONTROL_LISTEN=127.0.0.1:0 \
      TURNPIKE_RELAY_SECRETS="$SECRET" TURNPIKE_RELAY_USER_QUOTA=100000 \
      TURNPIKE_RELAY_GRACE_PERIOD=0s TURNPIKE_RELAY_RELAY_PORTS="$RELAY_MIN-$RELAY_MAX" \
      TURNPIKE_LOG_LEVEL=warn \
        "$TP" serve > "$log" 2>&1 &
      SERVER_PID=$!
      PORT=""
      for _ in $(seq 100); do
        PORT=$(sed -n 's|^turnpike: relay listening on udp://127.0.0.1:||p' "$log" | head -1)
        [ -n "$PORT" ] && break
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$log" >&2; exit 1; }
        sleep 0.05
      done
      [ -n "$PORT" ] || { echo "turnpike did not start" >&2; cat "$log" >&2; exit 1; }
      ;;
    coturn)
      PORT=$(free_port)
      turnserver -n --listening-ip=127.0.0.1 --relay-ip=127.0.0.1 --listening-port="$PORT" \
        --use-auth-secret --static-auth-secret="$SECRET" --realm=turnpike.local \
        --allow-loopback-peers --no-tls --no-dtls --no-cli --no-multicast-peers \
        --min-port="$RELAY_MIN" --max-port="$RELAY_MAX" --total-quota=0 --user-quota=0 \
        --log-file=stdout --simple-log > "$log" 2>&1 &
      SERVER_PID=$!
      for _ in $(seq 100); do
        ss -Hlun "sport = :$PORT" | grep -q . && break
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$log" >&2; exit 1; }
        sleep 0.05
      done
      sleep 0.2   # every relay thread has its listener
      ;;
    forward)
      # The echo peer is turnpike-load's (--echo): the forwarder has to know its port first.
      ECHO_PORT=$(free_port)
      "$FWD" --listen 127.0.0.1:0 --upstream "127.0.0.1:$ECHO_PORT" > "$log" 2>&1 &
      SERVER_PID=$!
      PORT=""
      for _ in $(seq 100); do
        PORT=$(sed -n 's|^forward listening on 127.0.0.1:||p' "$log" | head -1)
        [ -n "$PORT" ] && break
        kill -0 "$SERVER_PID" 2>/dev/null || { cat "$log" >&2; exit 1; }
        sleep 0.05
      done
      [ -n "$PORT" ] || { echo "turnpike-forward did not start" >&2; cat "$log" >&2; exit 1; }
      ;;
  esac
}
stop_server() {
  kill "$SERVER_PID" 2>/dev/null || true
  wait "$SERVER_PID" 2>/dev/null || true
  SERVER_PID=""
}

json() { python3 -c 'import json,sys; d=json.loads(sys.stdin.readline()); v=eval(sys.argv[1]); print("" if v is None else v)' "$1"; }

# One load against one fresh server: appends a row to $RAW.
run_load() {
  local server=$1 load=$2 round=$3 out="$WORK/$1-$2-$3.out" before after cpu_us
  start_server "$server"
  before=$(cpu_ticks "$SERVER_PID")
  case "$load" in
    uclient)
      turnutils_uclient -c -y -s -m 100 -n "$UC_N" -l 200 -z 1 -W "$SECRET" -u benchuser \
        -p "$PORT" 127.0.0.1 > "$out" 2>&1 || true
      ;;
    uclient_peer)
      # coturn's echo peer, outside the server: every message goes client -> relay -> peer ->
      # relay -> client.
      local peer_port peer_pid
      peer_port=$(free_port)
      turnutils_peer -p "$peer_port" -L 127.0.0.1 > /dev/null 2>&1 &
      peer_pid=$!
      for _ in $(seq 100); do ss -Hlun "sport = :$peer_port" | grep -q . && break; sleep 0.05; done
      turnutils_uclient -c -s -m 100 -n "$UC_N" -l 200 -z 1 -e 127.0.0.1 -r "$peer_port" \
        -W "$SECRET" -u benchuser -p "$PORT" 127.0.0.1 > "$out" 2>&1 || true
      kill "$peer_pid" 2>/dev/null || true
      wait "$peer_pid" 2>/dev/null || true
      ;;
    c2c|c2p|c2p_tick|c2p_uc|c2p_uc4|c2p_frames)
      local mode=client-to-client pacing=() allocs=100 size=200 rate=20000
      [ "$load" != c2c ] && mode=client-to-peer
      [ "$load" = c2p_tick ] && pacing=(--tick 10ms)
      # The shape of the uclient_peer load, measured on loopback with tcpdump (docs/benchmarks.md,
      # fourth session): about 29 000 msg/s in bursts every 3.5-4 ms, so the forwarder can be
      # driven the way coturn's client drives a TURN server.
      [ "$load" = c2p_uc ] && { pacing=(--tick 4ms); rate=29000; }
      # The same with coturn's client's grouping (sixth session): it sends 4 messages back to
      # back from each client, then the next client's 4, so each relay socket gets 4 at a time.
      [ "$load" = c2p_uc4 ] && { pacing=(--tick 4ms --burst 4); rate=29000; }
      # Video-like: 10 flows, each sending a 20-packet "frame" of 1 000-byte packets every 10 ms.
      [ "$load" = c2p_frames ] && { pacing=(--tick 10ms); allocs=10; size=1000; }
      local who=(--secret "$SECRET")
      [ "$server" = forward ] && { mode=raw-to-peer; who=(--echo "127.0.0.1:$ECHO_PORT"); }
      "$LOAD" --server "127.0.0.1:$PORT" "${who[@]}" --mode "$mode" --allocations "$allocs" \
        --size "$size" --rate "$rate" "${pacing[@]}" --duration "$DUR" --drain "$DRAIN" --json-only \
        > "$out" 2>/dev/null || true
      ;;
    max)
      timeout 120 "$LOAD" --server "127.0.0.1:$PORT" --secret "$SECRET" --find-max \
        --mode client-to-client --allocations 100 --size 200 --rate 10000 --step-duration "$STEP" \
        --max-steps "$MAXSTEPS" --drain "$DRAIN" --json-only > "$out" 2>/dev/null || true
      ;;
  esac
  after=$(cpu_ticks "$SERVER_PID")
  stop_server
  cpu_us=$(( (after - before) * 1000000 / HZ ))
  local msgs lost loss p99="" maxr="" limit="" extra=""
  case "$load" in
    uclient|uclient_peer)
      lost=$(sed -n 's/.*Total lost packets \([0-9]*\).*/\1/p' "$out" | tail -1)
      msgs=$(sed -n 's/.*tot_recv_msgs=\([0-9]*\).*/\1/p' "$out" | tail -1)
      extra=$(sed -n 's/.*Average round trip delay \([0-9.]*\) ms.*/\1/p' "$out" | tail -1)
      [ -n "$lost" ] || { echo "uclient output unreadable ($server round $round):" >&2; tail -5 "$out" >&2; lost=NA; }
      msgs=$UC_MSGS   # every message sent counts, as in the anchors
      if [ "$lost" = NA ]; then loss=NA
      else loss=$(awk -v l="$lost" -v m="$UC_MSGS" 'BEGIN{printf "%.4f", 100*l/m}'); fi
      ;;
    c2c|c2p|c2p_tick|c2p_uc|c2p_uc4|c2p_frames)
      if [ -s "$out" ]; then
        msgs=$(json 'd["received"]' < "$out"); lost=$(json 'd["lost"]' < "$out")
        loss=$(json 'd["loss_pct"]' < "$out"); p99=$(json 'd["latency_us"]["p99"]' < "$out")
      else msgs=0; lost=NA; loss=NA; fi
      ;;
    max)
      if [ -s "$out" ]; then
        maxr=$(json 'd.get("max_rate")' < "$out"); limit=$(json 'd.get("limit")' < "$out")
        msgs=$(json 'sum(s["received"] for s in d["steps"])' < "$out")
        lost=$(json 'sum(s["lost"] for s in d["steps"])' < "$out")
        loss=""
        # p99 at the highest step that stayed under 0.1 % loss
        p99=$(json 'max([s for s in d["steps"] if s["ok"]], key=lambda s: s["rate_target"], default={"latency_us":{"p99":None}})["latency_us"]["p99"]' < "$out")
        extra=$(json '";".join("%d(%d):%s%s@%s" % (s["rate_target"], round(s["pps_sent"]), round(s["loss_pct"],3), "g" if s.get("generator_limited") else "", round(s["latency_us"]["p99"] or 0)) for s in d["steps"])' < "$out")
      else msgs=0; lost=NA; loss=NA; limit=timeout; fi
      ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$server" "$load" "$round" "$cpu_us" \
    "$msgs" "$lost" "$loss" "$p99" "$maxr" "$limit" "$extra" >> "$RAW"
  echo "  $server $load round $round: cpu ${cpu_us} us, msgs $msgs, lost $lost, loss% $loss, p99 $p99, max $maxr $limit" >&2
}

# Memory per allocation: VmRSS before and at the peak of N idle allocations (1 packet/s total).
MEM=""
measure_memory() {
  local server=$1 n=10000 base peak r lp
  start_server "$server"
  sleep 0.3
  base=$(rss_kib "$SERVER_PID"); peak=$base
  "$LOAD" --server "127.0.0.1:$PORT" --secret "$SECRET" --mode client-to-client --allocations $n \
    --size 200 --rate 10 --duration 6s --drain 0.2s --json-only > "$WORK/mem-$server.out" 2>/dev/null &
  lp=$!
  while kill -0 "$lp" 2>/dev/null; do
    r=$(rss_kib "$SERVER_PID"); [ "$r" -gt "$peak" ] && peak=$r
    sleep 0.2
  done
  wait "$lp" || true
  local released; released=$(json 'd.get("released")' < "$WORK/mem-$server.out" 2>/dev/null || echo "?")
  stop_server
  MEM+="| $server | $n (released: $released) | $base | $peak | $(awk -v a="$base" -v b="$peak" -v n=$n 'BEGIN{printf "%.2f", (b-a)*1024/n/1024}') |"$'\n'
}

# ---------------------------------------------------------------- run
LOADS="uclient uclient_peer c2c c2p c2p_tick c2p_uc c2p_uc4 c2p_frames max"
[ "$ONLY_FWD" = 1 ] && LOADS="c2p c2p_tick c2p_uc c2p_uc4 c2p_frames"
has() { case " $LOADS " in *" $1 "*) return 0 ;; esac; return 1; }
START=$(date +%s)
for round in $(seq "$ROUNDS"); do
  for load in $LOADS; do
    servers="turnpike coturn"
    case "$load" in c2p|c2p_tick|c2p_uc|c2p_uc4|c2p_frames) servers="turnpike coturn forward turnpike1" ;; esac
    [ "$ONLY_FWD" = 1 ] && servers="turnpike forward turnpike1"
    for server in $servers; do
      run_load "$server" "$load" "$round"
    done
  done
done
if [ "$MEMORY" = 1 ]; then
  echo "memory: 10 000 idle allocations" >&2
  measure_memory turnpike
  measure_memory coturn
fi
ELAPSED=$(( $(date +%s) - START ))

# ---------------------------------------------------------------- report
report() {
python3 - "$RAW" "$UC_MSGS" <<'PY'
import sys, statistics as st
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
names = {"uclient": "turnutils_uclient -y -s, client-to-client (anchor)",
         "uclient_peer": "turnutils_uclient -s, client-to-peer via turnutils_peer",
         "c2c": "turnpike-load client-to-client 20k/s even",
         "c2p": "turnpike-load client-to-peer 20k/s even",
         "c2p_tick": "turnpike-load client-to-peer 20k/s, 10 ms ticks",
         "c2p_uc": "turnpike-load client-to-peer 29k/s, 4 ms ticks (the shape of coturn's client)",
         "c2p_uc4": "turnpike-load client-to-peer 29k/s, 4 ms ticks, 4 back to back per allocation (coturn's client's shape and grouping)",
         "c2p_frames": "turnpike-load client-to-peer 20k/s, 10 flows x 20-packet frames of 1000 B every 10 ms",
         "max": "turnpike-load find-max client-to-client"}
LOADS = ["uclient", "uclient_peer", "c2c", "c2p", "c2p_tick", "c2p_uc", "c2p_uc4", "c2p_frames", "max"]
UC = ("uclient", "uclient_peer")
def num(x):
    try: return float(x)
    except ValueError: return None
def med(xs):
    xs = [x for x in xs if x is not None]
    return st.median(xs) if xs else None
def f(x, d=1):
    return "—" if x is None else f"{x:.{d}f}"
def allr(xs, d=1):
    return ", ".join("—" if x is None else f"{x:.{d}f}" for x in xs)
meds = {}
print("| Load | Server | CPU µs/msg (median) | CPU µs/msg (rounds) | Loss % (rounds) | p99 µs (median; rounds) | Max msg/s < 0.1 % loss (rounds; limit) |")
print("|---|---|---|---|---|---|---|")
for load in LOADS:
    for server in ["turnpike", "coturn", "forward", "turnpike1"]:
        rs = [r for r in rows if r[0] == server and r[1] == load]
        if not rs: continue
        cpu = [num(r[3]) / num(r[4]) if num(r[4]) else None for r in rs]
        loss = [num(r[6]) for r in rs]
        p99 = [num(r[7]) for r in rs]
        mx = [num(r[8]) for r in rs]
        meds[(load, server)] = dict(cpu=med(cpu), loss=max([l for l in loss if l is not None], default=None), p99=med(p99), max=med(mx))
        limits = ",".join(sorted(set(r[9] for r in rs if r[9])))
        lossc = "—" if load == "max" else allr(loss, 3)
        p99c = "—" if load in UC else f"{f(med(p99),0)}; {allr(p99,0)}"
        maxc = f"{f(med(mx),0)} ({allr(mx,0)}; {limits})" if load == "max" else "—"
        label = {"forward": "turnpike-forward (raw-to-peer baseline)",
                 "turnpike1": "turnpike, one shard (relay.threads = 1, the forwarder's one thread)"}.get(server, server)
        print(f"| {names[load]} | {label} | {f(med(cpu),2)} | {allr(cpu,2)} | {lossc} | {p99c} | {maxc} |")
def ratio(a, b): return "—" if a is None or b is None or b == 0 else f"{a/b:.2f}×"
vs_coturn = [l for l in LOADS if meds.get((l, "turnpike")) and meds.get((l, "coturn"))]
if vs_coturn:
    print()
    print("Ratio Turnpike / coturn (medians; lower is better except max msg/s):")
    print()
    print("| Load | CPU µs/msg | p99 | max msg/s | worst loss % Turnpike / coturn |")
    print("|---|---|---|---|---|")
for load in vs_coturn:
    t, c = meds[(load, "turnpike")], meds[(load, "coturn")]
    print(f"| {names[load]} | {ratio(t['cpu'], c['cpu'])} | {ratio(t['p99'], c['p99']) if load not in UC else '—'} | "
          f"{ratio(t['max'], c['max']) if load == 'max' else '—'} | "
          f"{f(t['loss'],3) if load != 'max' else '—'} / {f(c['loss'],3) if load != 'max' else '—'} |")
fw = [(l, who, meds.get((l, who)), meds.get((l, "forward")))
      for who in ("turnpike", "turnpike1") for l in ("c2p", "c2p_tick", "c2p_uc", "c2p_uc4", "c2p_frames")]
fw = [x for x in fw if x[2] and x[3]]
if fw:
    print()
    print("Ratio Turnpike / turnpike-forward, the bare one-recv-one-send forwarder on one thread (medians; the issue asks for ≤ 1.2× on CPU). "
          "Turnpike by default (one shard per core) and with one shard, the forwarder's thread count:")
    print()
    print("| Load | Turnpike | CPU µs/msg | p99 | worst loss % Turnpike / forwarder |")
    print("|---|---|---|---|---|")
    for l, who, t, w in fw:
        label = "one shard" if who == "turnpike1" else "default"
        print(f"| {names[l]} | {label} | {ratio(t['cpu'], w['cpu'])} | {ratio(t['p99'], w['p99'])} | {f(t['loss'],3)} / {f(w['loss'],3)} |")
# Target 4 at one rate: each server's p99 at its own maximum compares different rates, so also
# compare at the highest step both servers relayed with < 0.1 % loss, round by round.
def steps(r):
    out = {}
    for st_ in r[10].split(";"):
        try:
            rate, rest = st_.split(":", 1)
            loss_, p = rest.split("@")
            # "target(sent)": steps are matched on their target rate.
            out[int(rate.split("(")[0])] = (float(loss_.rstrip("g")), float(p))
        except ValueError:
            pass
    return out
common = []
for rnd in sorted(set(r[2] for r in rows if r[1] == "max")):
    t = [r for r in rows if r[1] == "max" and r[0] == "turnpike" and r[2] == rnd]
    c = [r for r in rows if r[1] == "max" and r[0] == "coturn" and r[2] == rnd]
    if not t or not c: continue
    ts, cs = steps(t[0]), steps(c[0])
    ok = [k for k in ts if k in cs and ts[k][0] < 0.1 and cs[k][0] < 0.1]
    if ok:
        k = max(ok)
        common.append((rnd, k, ts[k][1], cs[k][1]))
if common:
    print()
    print("p99 at the highest find-max step both servers relayed with < 0.1 % loss (per round):")
    print()
    print("| Round | rate msg/s | Turnpike p99 µs | coturn p99 µs | Turnpike / coturn |")
    print("|---|---|---|---|---|")
    for rnd, k, tp, cp in common:
        print(f"| {rnd} | {k} | {tp:.0f} | {cp:.0f} | {ratio(tp, cp)} |")
    print(f"| median | — | {st.median(x[2] for x in common):.0f} | {st.median(x[3] for x in common):.0f} | "
          f"{ratio(st.median(x[2] for x in common), st.median(x[3] for x in common))} |")
maxrows = [r for r in rows if r[1] == "max"]
if maxrows:
    print()
    print("Find-max steps per round (target(sent) msg/s:loss%[g]@p99µs, g = generator sent under 90 % of the target; max msg/s is what was sent at the best passing step):")
    print()
for r in maxrows:
    print(f"- {r[0]} round {r[2]}: {r[10]}")
for load in UC:
    uc = [r for r in rows if r[1] == load and r[10]]
    if uc:
        print()
        print(f"{names[load]}, average round trip (ms): " + "; ".join(f"{r[0]} r{r[2]} {r[10]}" for r in uc))
PY
}

{
  echo "# Turnpike vs coturn — $DATE"
  echo
  echo "Machine: $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $(uname -sr), loopback;"
  echo "$(turnserver --version 2>/dev/null | head -1 | sed 's/^/coturn /') ; turnpike $(git rev-parse --short HEAD 2>/dev/null)$(git diff --quiet 2>/dev/null || echo '+dirty');"
  echo "rounds: $ROUNDS (A B alternating per load, each on a freshly started server); quick: $QUICK; wall time ${ELAPSED}s; load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
  echo
  # TURNPIKE_* variables in the caller's environment reach the Turnpike server: say so.
  OVERRIDES=$(env | grep '^TURNPIKE_' | sort | tr '\n' ' ' | sed 's/ $//' || true)
  echo "Command: \`${OVERRIDES:+$OVERRIDES }bench/compare.sh --rounds $ROUNDS$([ "$QUICK" = 1 ] && echo ' --quick')$([ "$ONLY_FWD" = 1 ] && echo ' --only-forwarder')$([ "$MEMORY" = 0 ] && [ "$ONLY_FWD" = 0 ] && echo ' --no-memory')\`"
  echo
  report
  if [ -n "$MEM" ]; then
    echo
    echo "Memory: VmRSS (KiB) of the server before and at the peak of 10 000 allocations (turnpike-load client-to-client, 10 packets/s in total):"
    echo
    echo "| Server | Allocations | RSS before | RSS peak | KiB per allocation |"
    echo "|---|---|---|---|---|"
    printf '%s' "$MEM"
  fi
  echo
  echo "Loads (per round, per server; SECRET is random per run, PORT free per start):"
  echo
  echo '```sh'
  if has uclient; then echo "turnutils_uclient -c -y -s -m 100 -n $UC_N -l 200 -z 1 -W \$SECRET -u benchuser -p \$PORT 127.0.0.1"; fi
  if has uclient_peer; then echo "turnutils_peer -p \$PEER_PORT -L 127.0.0.1 &   # then:"; fi
  if has uclient_peer; then echo "turnutils_uclient -c -s -m 100 -n $UC_N -l 200 -z 1 -e 127.0.0.1 -r \$PEER_PORT -W \$SECRET -u benchuser -p \$PORT 127.0.0.1"; fi
  if has c2c; then echo "turnpike-load --server 127.0.0.1:\$PORT --secret \$SECRET --mode client-to-client --allocations 100 --size 200 --rate 20000 --duration $DUR --drain $DRAIN --json-only"; fi
  echo "turnpike-load --server 127.0.0.1:\$PORT --secret \$SECRET --mode client-to-peer   --allocations 100 --size 200 --rate 20000 --duration $DUR --drain $DRAIN --json-only"
  echo "turnpike-load --server 127.0.0.1:\$PORT --secret \$SECRET --mode client-to-peer   --allocations 100 --size 200 --rate 20000 --tick 10ms --duration $DUR --drain $DRAIN --json-only"
  echo "turnpike-load --server 127.0.0.1:\$PORT --secret \$SECRET --mode client-to-peer   --allocations 100 --size 200 --rate 29000 --tick 4ms --duration $DUR --drain $DRAIN --json-only   # coturn's client's shape"
  echo "turnpike-load --server 127.0.0.1:\$PORT --secret \$SECRET --mode client-to-peer   --allocations 100 --size 200 --rate 29000 --tick 4ms --burst 4 --duration $DUR --drain $DRAIN --json-only   # coturn's client's shape and grouping"
  echo "turnpike-load --server 127.0.0.1:\$PORT --secret \$SECRET --mode client-to-peer   --allocations 10 --size 1000 --rate 20000 --tick 10ms --duration $DUR --drain $DRAIN --json-only   # frames"
  echo "turnpike-load --server 127.0.0.1:\$FWD_PORT --echo 127.0.0.1:\$ECHO_PORT --mode raw-to-peer --allocations 100 --size 200 --rate 20000 [--tick 10ms] --duration $DUR --drain $DRAIN --json-only   # against the forwarder (coturn's client's shape: --rate 29000 --tick 4ms [--burst 4]; frames: --allocations 10 --size 1000 --tick 10ms)"
  if has max; then echo "turnpike-load --server 127.0.0.1:\$PORT --secret \$SECRET --find-max --mode client-to-client --allocations 100 --size 200 --rate 10000 --step-duration $STEP --max-steps $MAXSTEPS --drain $DRAIN --json-only"; fi
  echo '```'
  echo
  echo "Servers:"
  echo
  echo '```sh'
  echo "TURNPIKE_RELAY_LISTEN=udp://127.0.0.1:0 TURNPIKE_ADMIN_LISTEN=127.0.0.1:0 TURNPIKE_RELAY_SECRETS=\$SECRET TURNPIKE_RELAY_USER_QUOTA=100000 TURNPIKE_RELAY_GRACE_PERIOD=0s TURNPIKE_RELAY_RELAY_PORTS=$RELAY_MIN-$RELAY_MAX TURNPIKE_LOG_LEVEL=warn target/release/turnpike serve"
  echo "# one shard (the forwarder loads): the same with TURNPIKE_RELAY_THREADS=1"
  echo "target/release/turnpike-forward --listen 127.0.0.1:0 --upstream 127.0.0.1:\$ECHO_PORT"
  if [ "$ONLY_FWD" = 0 ]; then echo "turnserver -n --listening-ip=127.0.0.1 --relay-ip=127.0.0.1 --listening-port=\$PORT --use-auth-secret --static-auth-secret=\$SECRET --realm=turnpike.local --allow-loopback-peers --no-tls --no-dtls --no-cli --no-multicast-peers --min-port=$RELAY_MIN --max-port=$RELAY_MAX --total-quota=0 --user-quota=0 --log-file=stdout --simple-log"; fi
  echo '```'
  echo
  echo "CPU = utime + stime of the server process (/proc/PID/stat fields 14 + 15, $HZ ticks/s) read just before and after each load; µs per message = CPU ÷ messages received$(has uclient && echo " (uclient: ÷ $UC_MSGS sent)")."
} > "$WORK/report.md"
cp "$WORK/report.md" "$OUT"
cat "$OUT"
echo >&2
echo "written: $OUT" >&2
