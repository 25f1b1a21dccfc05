#!/usr/bin/env bash
# Several peers sending to one node at once: aggregate TCP throughput into the receiver, its CPU
# and RSS, with receive lanes (threads that decrypt for their peers) against without, in one
# invocation. The receiver is restarted between variants (same state, MESHD_RX_LANES set).
#
#   [fi-r] 198.51.100.1 (receiver)   [fi-s1] 198.51.100.2   [fi-s2] 198.51.100.3 ...
#        \_____________________________|_______________________/
#                            bridge br0 in [fi-br]
#
# Usage (as root): benches/fanin.sh [seconds per run, default 10] [rounds, default 3]
#                  [senders, default 2] [lanes with, default 1]
# Needs: iperf3, iproute2, python3 (Debian packages). Builds meshd --release.
# Per round, for each variant (lanes 0, then lanes N): every sender runs iperf3 to the receiver
# at the same time; prints the sum, the receiver's CPU (cores) and RSS, medians and the ratio.
set -euo pipefail
SECS=${1:-10}
ROUNDS=${2:-3}
SENDERS=${3:-2}
LANES=${4:-1}
cd "$(dirname "$0")/.."
. benches/common.sh
cargo build --release --quiet
MESHD=$PWD/target/release/meshd
MESHCTL=$PWD/target/release/meshctl
BR=fi-br
NS=(fi-r)
for i in $(seq 1 "$SENDERS"); do NS+=("fi-s$i"); done
WORK=""

cleanup() {
  set +e
  lab_down "${NS[@]}" $BR
  [ -n "$WORK" ] && rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
cleanup
WORK=$(mktemp -d /tmp/meshd-fanin.XXXXXX)
lab_up $BR "${NS[@]}"
ctl() { local n=$1; shift; ip netns exec fi-$n "$MESHCTL" --socket $WORK/$n.sock "$@"; }
meshd_pid() { local p; for p in $(ip netns pids "$1"); do
  [ "$(cat /proc/$p/comm)" = meshd ] && echo "$p"; done | tail -1; }

ip netns exec fi-r "$MESHD" init --name r --state-dir $WORK/r --socket $WORK/r.sock \
  --endpoint 198.51.100.1:51820 >$WORK/r.out 2>$WORK/r.log & disown
wait_for 20 grep -q "meshd join" $WORK/r.out
TOKEN=$(awk '/meshd join/{print $3}' $WORK/r.out)
i=2
for s in $(seq 1 "$SENDERS"); do
  ip netns exec fi-s$s "$MESHD" join "$TOKEN" --name s$s --state-dir $WORK/s$s \
    --socket $WORK/s$s.sock --endpoint 198.51.100.$i:51820 >$WORK/s$s.out 2>$WORK/s$s.log & disown
  i=$((i + 1))
done
MR=$(ctl r status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["self"]["mesh_ip"])')
for s in $(seq 1 "$SENDERS"); do wait_for 30 ip netns exec fi-s$s ping -c1 -W1 "$MR"; done
for s in $(seq 1 "$SENDERS"); do ip netns exec fi-r iperf3 -s -D -p $((5200 + s)) >/dev/null; done

# Restart the receiver with MESHD_RX_LANES=$1 and wait until every sender reaches it again.
restart_r() {
  local p; p=$(meshd_pid fi-r)
  kill "$p"; wait_for 10 bash -c "! kill -0 $p"
  ip netns exec fi-r env MESHD_RX_LANES="$1" "$MESHD" run --state-dir $WORK/r \
    --socket $WORK/r.sock >>$WORK/r.log 2>&1 & disown
  for s in $(seq 1 "$SENDERS"); do wait_for 30 ip netns exec fi-s$s ping -c1 -W1 "$MR"; done
  for s in $(seq 1 "$SENDERS"); do
    wait_for 10 ip netns exec fi-s$s bash -c "echo > /dev/tcp/$MR/$((5200 + s))"
  done
}
TCK=$(getconf CLK_TCK)
ticks() { awk '{print $14 + $15}' /proc/$1/stat; }

echo "meshd $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores, $SENDERS senders, ${SECS}s per run, $ROUNDS rounds"
RES=$WORK/results; : >$RES
for r in $(seq 1 "$ROUNDS"); do
  for lanes in 0 "$LANES"; do
    restart_r "$lanes"
    pr=$(meshd_pid fi-r); t0=$(ticks $pr); s0=$(date +%s.%N)
    for s in $(seq 1 "$SENDERS"); do
      ip netns exec fi-s$s iperf3 -c "$MR" -p $((5200 + s)) -t "$SECS" -J >$WORK/ip$s.json 2>/dev/null &
    done
    wait
    cpu=$(python3 -c "print(($(ticks $pr) - $t0) / $TCK / ($(date +%s.%N) - $s0))")
    sum=$(python3 -c '
import json, sys
print("%.0f" % sum(json.load(open(f))["end"]["sum_received"]["bits_per_second"] / 1e6 for f in sys.argv[1:]))' $WORK/ip*.json)
    rss=$(awk '/^VmRSS/{print $2}' /proc/$pr/status)
    echo "$lanes $sum $cpu $rss" >>$RES
    printf 'round %d lanes %d: %6s Mbit/s in all  receiver cpu %.2f cores  rss %.1f MB\n' \
      "$r" "$lanes" "$sum" "$cpu" "$(awk "BEGIN{print $rss/1024}")"
  done
done

python3 - "$RES" "$LANES" <<'PY'
import sys, statistics as st
rows = {}
for line in open(sys.argv[1]):
    l, *v = line.split()
    rows.setdefault(int(l), []).append([float(x) for x in v])
med = {l: [st.median(c) for c in zip(*v)] for l, v in rows.items()}
print()
print(f"{'lanes':>6}{'Mbit/s':>10}{'recv CPU':>10}{'RSS MB':>8}")
for l, (t, cpu, rss) in sorted(med.items()):
    print(f"{l:>6}{t:>10.0f}{cpu:>10.2f}{rss/1024:>8.1f}")
n = int(sys.argv[2])
print(f"lanes {n} / lanes 0: {med[n][0] / med[0][0]:.2f}x aggregate throughput (medians over rounds)")
PY
