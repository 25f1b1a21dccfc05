#!/usr/bin/env bash
# Queries per second of meshd's DNS against dnsmasq serving a zone of the same size, measured
# with dnsperf in one invocation, alternating runs, in one network namespace.
#
#   [mbd-a] meshd (init), N services published -> zone: node A + N x (svc A, instance A, SRV)
#           dnsmasq on 127.0.0.1:5353 with the same names and records
#           dnsperf -> each server in turn
#
# Usage (as root): benches/dns.sh [services, default 100] [seconds per run, default 10] [rounds, default 2]
# Needs: dnsperf, dnsmasq-base, iproute2 (Debian packages). Builds meshd --release.
set -euo pipefail
N=${1:-100}
SECS=${2:-10}
ROUNDS=${3:-2}
cd "$(dirname "$0")/.."
# MESHD=/path/to/meshd (with its meshctl beside it) measures another build instead.
if [ -z "${MESHD:-}" ]; then cargo build --release --quiet; MESHD=$PWD/target/release/meshd; fi
MESHCTL=$(dirname "$MESHD")/meshctl
NS=mbd-a
WORK=$(mktemp -d /tmp/meshd-dnsbench.XXXXXX)
cleanup() {
  set +e
  for p in $(ip netns pids $NS 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
  ip netns del $NS 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
cleanup; WORK=$(mktemp -d /tmp/meshd-dnsbench.XXXXXX)
ip netns add $NS
ip -n $NS link set lo up
ip -n $NS link add veth0 type veth peer name veth1
ip -n $NS addr add 198.51.100.1/24 dev veth0
ip -n $NS link set veth0 up; ip -n $NS link set veth1 up

wait_for() { local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do [ $SECONDS -lt $deadline ] || { echo "timed out: $*" >&2; exit 1; }; sleep 0.1; done; }

ip netns exec $NS "$MESHD" init --name a --state-dir $WORK/a --socket $WORK/a.sock \
  --endpoint 198.51.100.1:51820 --dns-upstream 192.0.2.53 >$WORK/a.out 2>$WORK/a.log & disown
wait_for 20 test -S $WORK/a.sock
MIP=$(ip netns exec $NS "$MESHCTL" --socket $WORK/a.sock status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["self"]["mesh_ip"])')
for i in $(seq 1 "$N"); do
  ip netns exec $NS "$MESHCTL" --socket $WORK/a.sock service add "svc$i" --port $((8000 + i)) >/dev/null
done

# dnsmasq with the same names and records.
{
  echo "host-record=a.mesh.internal,$MIP"
  for i in $(seq 1 "$N"); do
    echo "host-record=svc$i.svc.mesh.internal,$MIP"
    echo "host-record=a.svc$i.svc.mesh.internal,$MIP"
    echo "srv-host=_svc$i._tcp.svc.mesh.internal,a.svc$i.svc.mesh.internal,$((8000 + i)),0,10"
  done
} >$WORK/dnsmasq.conf
ip netns exec $NS dnsmasq --no-daemon --conf-file=$WORK/dnsmasq.conf --no-resolv --no-hosts \
  --local=/mesh.internal/ --listen-address=127.0.0.1 --bind-interfaces --port=5353 --pid-file= \
  --cache-size=0 >$WORK/dnsmasq.log 2>&1 & disown

# The same query mix for both: node, service A, instance A, SRV.
{
  echo "a.mesh.internal A"
  for i in $(seq 1 "$N"); do
    echo "svc$i.svc.mesh.internal A"
    echo "a.svc$i.svc.mesh.internal A"
    echo "_svc$i._tcp.svc.mesh.internal SRV"
  done
} >$WORK/queries
wait_for 20 ip netns exec $NS dig +time=1 +tries=1 @$MIP "svc$N.svc.mesh.internal" +short
wait_for 20 ip netns exec $NS dig +time=1 +tries=1 -p 5353 @127.0.0.1 "svc$N.svc.mesh.internal" +short
[ "$(ip netns exec $NS dig @$MIP +short "svc$N.svc.mesh.internal")" = "$MIP" ] || { echo "meshd zone incomplete" >&2; exit 1; }

qps() { # qps SERVER PORT
  ip netns exec $NS dnsperf -s "$1" -p "$2" -d $WORK/queries -l "$SECS" -c 4 -q 200 2>/dev/null |
    awk '/Queries per second/{print $4}'
}
echo "meshd $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores, zone: 1 node + $N services ($((1 + 3 * N)) names), ${SECS}s per run, $ROUNDS rounds"
M=(); D=()
for r in $(seq 1 "$ROUNDS"); do
  M+=("$(qps "$MIP" 53)"); D+=("$(qps 127.0.0.1 5353)")
  echo "round $r: meshd ${M[-1]} qps | dnsmasq ${D[-1]} qps"
done
python3 - "${M[*]}" "${D[*]}" <<'PY'
import sys, statistics as st
m = [float(x) for x in sys.argv[1].split()]
d = [float(x) for x in sys.argv[2].split()]
print(f"\nmedian qps: meshd {st.median(m):.0f}, dnsmasq {st.median(d):.0f}, ratio meshd/dnsmasq {st.median(m)/st.median(d):.2f}")
PY
