#!/usr/bin/env bash
# Connection rate and throughput through meshd's gateway against HAProxy doing SNI passthrough
# over the same mesh, in one invocation, alternating runs.
#
#   [mbg-c] client 198.51.100.3 --> [mbg-gw] 198.51.100.1 :443  meshd gateway ==mesh==> [mbg-s] meshd serve -> 127.0.0.1:9443
#                                                         :8443 haproxy (SNI) ==mesh==> [mbg-s] mesh_ip:9443
#   The workload (benches/gateway_load.rs serve) listens on 0.0.0.0:9443 in mbg-s, so both paths
#   end at the same TLS server; both cross the same WireGuard tunnel.
#
# Usage (as root): benches/gateway.sh [seconds, default 10] [concurrency, default 32] [MiB, default 256] [rounds, default 2]
# Needs: haproxy, iproute2 (Debian packages). Builds meshd and gateway_load --release.
set -euo pipefail
SECS=${1:-10}
CONC=${2:-32}
MIB=${3:-256}
ROUNDS=${4:-2}
cd "$(dirname "$0")/.."
cargo build --release --quiet
cargo build --release --quiet --example gateway_load
MESHD=$PWD/target/release/meshd
MESHCTL=$PWD/target/release/meshctl
LOAD=$PWD/target/release/examples/gateway_load
NAME=bench.example.test
WORK=$(mktemp -d /tmp/meshd-gwbench.XXXXXX)
NS=(mbg-gw mbg-s mbg-c)
cleanup() {
  set +e
  for ns in "${NS[@]}" mbg-hub; do
    for p in $(ip netns pids $ns 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
    ip netns del $ns 2>/dev/null
  done
  [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
cleanup; WORK=$(mktemp -d /tmp/meshd-gwbench.XXXXXX)
ip netns add mbg-hub; ip -n mbg-hub link add br0 type bridge; ip -n mbg-hub link set br0 up
i=1
for ns in "${NS[@]}"; do
  ip netns add $ns
  ip -n mbg-hub link add v$i type veth peer name eth0 netns $ns
  ip -n mbg-hub link set v$i master br0 up
  ip -n $ns link set lo up; ip -n $ns link set eth0 up
  ip -n $ns addr add 198.51.100.$i/24 dev eth0
  i=$((i + 1))
done
wait_for() { local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do [ $SECONDS -lt $deadline ] || { echo "timed out: $*" >&2; exit 1; }; sleep 0.1; done; }

ip netns exec mbg-gw "$MESHD" init --name gw --state-dir $WORK/gw --socket $WORK/gw.sock \
  --endpoint 198.51.100.1:51820 >$WORK/gw.out 2>$WORK/gw.log & disown
wait_for 20 grep -q "meshd join" $WORK/gw.out
TOKEN=$(awk '/meshd join/{print $3}' $WORK/gw.out)
ip netns exec mbg-s "$MESHD" join "$TOKEN" --name s --state-dir $WORK/s --socket $WORK/s.sock \
  --endpoint 198.51.100.2:51820 >$WORK/s.out 2>$WORK/s.log & disown
wait_for 20 test -S $WORK/s.sock
SIP=$(ip netns exec mbg-s "$MESHCTL" --socket $WORK/s.sock status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["self"]["mesh_ip"])')
wait_for 20 ip netns exec mbg-gw ping -c1 -W1 $SIP

ip netns exec mbg-s "$LOAD" serve 0.0.0.0:9443 $NAME >$WORK/load.log 2>&1 & disown
ip netns exec mbg-s "$MESHCTL" --socket $WORK/s.sock expose $NAME --to 127.0.0.1:9443 >/dev/null
ip netns exec mbg-gw "$MESHCTL" --socket $WORK/gw.sock gateway enable --http off >/dev/null

cat >$WORK/haproxy.cfg <<CFG
global
  maxconn 8000
defaults
  mode tcp
  timeout connect 5s
  timeout client 30s
  timeout server 30s
frontend sni
  bind 198.51.100.1:8443
  tcp-request inspect-delay 5s
  tcp-request content accept if { req_ssl_hello_type 1 }
  use_backend mesh if { req_ssl_sni -i $NAME }
backend mesh
  server s $SIP:9443
CFG
ip netns exec mbg-gw haproxy -f $WORK/haproxy.cfg -db >$WORK/haproxy.log 2>&1 & disown
wait_for 20 ip netns exec mbg-c "$LOAD" throughput 198.51.100.1:443 $NAME 1
wait_for 20 ip netns exec mbg-c "$LOAD" throughput 198.51.100.1:8443 $NAME 1

echo "meshd $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores; rate: ${SECS}s x $CONC concurrent (connect+TLS+GET+close); throughput: one ${MIB} MiB GET; $ROUNDS rounds"
RM=(); RH=(); TM=(); TH=()
for r in $(seq 1 "$ROUNDS"); do
  RM+=("$(ip netns exec mbg-c "$LOAD" rate 198.51.100.1:443 $NAME "$SECS" "$CONC" | cut -d' ' -f1)")
  RH+=("$(ip netns exec mbg-c "$LOAD" rate 198.51.100.1:8443 $NAME "$SECS" "$CONC" | cut -d' ' -f1)")
  TM+=("$(ip netns exec mbg-c "$LOAD" throughput 198.51.100.1:443 $NAME $((MIB * 1048576)) | cut -d' ' -f1)")
  TH+=("$(ip netns exec mbg-c "$LOAD" throughput 198.51.100.1:8443 $NAME $((MIB * 1048576)) | cut -d' ' -f1)")
  echo "round $r: meshd ${RM[-1]} conn/s ${TM[-1]} Mbit/s | haproxy ${RH[-1]} conn/s ${TH[-1]} Mbit/s"
done
python3 - "${RM[*]}" "${RH[*]}" "${TM[*]}" "${TH[*]}" <<'PY'
import sys, statistics as st
rm, rh, tm, th = ([float(x) for x in a.split()] for a in sys.argv[1:5])
m = st.median
print()
print(f"{'':22}{'meshd':>10}{'haproxy':>10}{'ratio':>8}")
print(f"{'connections/s':22}{m(rm):>10.0f}{m(rh):>10.0f}{m(rm)/m(rh):>8.2f}")
print(f"{'throughput Mbit/s':22}{m(tm):>10.0f}{m(th):>10.0f}{m(tm)/m(th):>8.2f}")
PY
