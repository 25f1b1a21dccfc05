#!/usr/bin/env bash
# TCP throughput and ping RTT from a workload on one node to a workload on another, next to
# node-to-node over the same two-node mesh, in one invocation (issue: workloads on the /24).
#
#   [mw-a] 198.51.100.1 ---veth--- 198.51.100.2 [mw-b]
#     meshd mesh0 10.210.x.1   <->   10.210.y.1 mesh0
#     meshbr0 ── namespace mwl-a 10.210.x.2        meshbr0 ── namespace mwl-b 10.210.y.2
#
# node → node:         iperf3 in mw-a to the server in mw-b on b's .1
# workload → workload: iperf3 in mwl-a (a's bridge, forwarded into the tunnel) to the server in
#                      mwl-b (forwarded out of b's tunnel onto b's bridge)
#
# Usage (as root): benches/workloads.sh [seconds per run, default 10] [rounds, default 3]
# Needs: iperf3, nftables, iproute2 (Debian packages). Builds meshd --release.
# Runs alternate between the two paths so background noise hits both alike; prints medians and
# the ratio workload/node.
set -euo pipefail
SECS=${1:-10}
ROUNDS=${2:-3}
cd "$(dirname "$0")/.."
cargo build --release --quiet
MESHD=$PWD/target/release/meshd
MESHCTL=$PWD/target/release/meshctl
A=mw-a; B=mw-b; WA=mwl-a; WB=mwl-b
WORK=

cleanup() {
  set +e
  for ns in $WA $WB $A $B; do
    for p in $(ip netns pids $ns 2>/dev/null); do kill "$p" 2>/dev/null; done
  done
  # meshd removes its bridge and table on SIGTERM; give it a moment, bounded.
  for _ in $(seq 50); do
    [ -z "$(ip netns pids $A 2>/dev/null)$(ip netns pids $B 2>/dev/null)" ] && break
    sleep 0.1
  done
  for ns in $WA $WB $A $B; do
    for p in $(ip netns pids $ns 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
    ip netns del $ns 2>/dev/null
  done
  rm -rf /etc/netns/$WA /etc/netns/$WB
  [ -n "$WORK" ] && rm -rf "$WORK"
}
[ -n "${KEEP:-}" ] || trap cleanup EXIT INT TERM
cleanup
WORK=$(mktemp -d /tmp/meshd-bench.XXXXXX)

ip netns add $A; ip netns add $B
ip link add veth-a netns $A type veth peer name veth-b netns $B
ip -n $A addr add 198.51.100.1/24 dev veth-a; ip -n $B addr add 198.51.100.2/24 dev veth-b
for ns in $A $B; do ip -n $ns link set lo up; done
ip -n $A link set veth-a up; ip -n $B link set veth-b up

wait_for() { # wait_for SECONDS COMMAND...
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { echo "timed out: $*" >&2; exit 1; }
    sleep 0.1
  done
}
# meshd runs in the node namespaces through nsenter, not `ip netns exec`: the latter gives it a
# mount namespace of its own, and the workload namespaces it pins under /run/netns would not
# be seen from here.
in_node() { local ns=$1; shift; nsenter --net=/run/netns/"$ns" "$@"; }
ctl() { local ns=$1; shift; in_node "$ns" "$MESHCTL" --socket "$WORK/$ns.sock" "$@"; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

in_node $A "$MESHD" init --name a --state-dir $WORK/a --socket $WORK/$A.sock \
  --endpoint 198.51.100.1:51820 >$WORK/a.out 2>$WORK/a.log & disown
wait_for 20 grep -q "meshd join" $WORK/a.out
TOKEN=$(awk '/meshd join/{print $3}' $WORK/a.out)
in_node $B "$MESHD" join "$TOKEN" --name b --state-dir $WORK/b --socket $WORK/$B.sock \
  --endpoint 198.51.100.2:51820 >$WORK/b.out 2>$WORK/b.log & disown
wait_for 20 test -S $WORK/$B.sock
MB=$(ctl $B status --json | json 'd["self"]["mesh_ip"]')
wait_for 20 ip netns exec $A ping -c1 -W1 "$MB"

for ns in $A $B; do
  ctl $ns workloads enable >/dev/null
done
ctl $A workload add $WA >/dev/null
ctl $B workload add $WB >/dev/null
WLB=$(ctl $B workload ls --json | json "[w['ip'] for w in d['workloads'] if w['name']=='$WB'][0]")
wait_for 20 ip netns exec $WA ping -c1 -W1 "$WLB"

ip netns exec $B iperf3 -s -D -p 5201 >/dev/null
ip netns exec $WB iperf3 -s -D -p 5202 >/dev/null
wait_for 10 ip netns exec $A bash -c "echo > /dev/tcp/$MB/5201"
wait_for 10 ip netns exec $WA bash -c "echo > /dev/tcp/$WLB/5202"

tput_mbit() { # tput_mbit NS DEST PORT
  ip netns exec "$1" iperf3 -c "$2" -p "$3" -t "$SECS" -J 2>/dev/null |
    python3 -c 'import json,sys; print("%.0f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e6))'
}
rtt_ms() { # rtt_ms NS DEST
  ip netns exec "$1" ping -q -c 200 -i 0.01 "$2" | awk -F/ '/^rtt/{print $5}'
}

echo "meshd $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores, ${SECS}s per run, $ROUNDS rounds"
echo "node $MB, workloads $(ctl $A workload ls --json | json "d['workloads'][0]['ip']") -> $WLB"
declare -a T_N T_W R_N R_W
for r in $(seq 1 "$ROUNDS"); do
  T_N+=("$(tput_mbit $A "$MB" 5201)"); T_W+=("$(tput_mbit $WA "$WLB" 5202)")
  R_N+=("$(rtt_ms $A "$MB")");         R_W+=("$(rtt_ms $WA "$WLB")")
  echo "round $r: node->node ${T_N[-1]} Mbit/s ${R_N[-1]} ms | workload->workload ${T_W[-1]} Mbit/s ${R_W[-1]} ms"
done

python3 - "${T_N[*]}" "${T_W[*]}" "${R_N[*]}" "${R_W[*]}" <<'PY'
import sys, statistics as st
tn, tw, rn, rw = ([float(x) for x in a.split()] for a in sys.argv[1:5])
m = st.median
print()
print(f"{'':24}{'node->node':>12}{'workload->workload':>20}{'ratio':>8}")
print(f"{'TCP throughput Mbit/s':24}{m(tn):>12.0f}{m(tw):>20.0f}{m(tw)/m(tn):>8.2f}")
print(f"{'ping RTT avg ms':24}{m(rn):>12.3f}{m(rw):>20.3f}{m(rw)/m(rn):>8.2f}")
print("(medians over rounds; the workload path adds a veth and the bridge at each end)")
PY
