#!/usr/bin/env bash
# TCP throughput and ping RTT through a two-node mesh: meshd against wireguard-go (the reference
# userspace WireGuard), over the same pair of network namespaces, in one invocation.
#
#   [mb-a] 198.51.100.1 ---veth--- 198.51.100.2 [mb-b]
#     meshd   mesh0 10.210.x.1  <->  10.210.y.1 mesh0   (UDP 51820)
#     wg-go   wga   10.99.0.1   <->  10.99.0.2  wgb     (UDP 51821)
# (distinct names: wireguard-go's UAPI socket /var/run/wireguard/NAME.sock is not per namespace)
#
# Usage (as root): benches/throughput.sh [seconds per run, default 10] [rounds, default 2]
# Needs: iperf3, wireguard-go, wireguard-tools, iproute2 (Debian packages). Builds meshd --release.
# Prints each measurement and the ratios meshd / wireguard-go. Runs alternate between the two
# so background noise on the machine hits both alike.
set -euo pipefail
SECS=${1:-10}
ROUNDS=${2:-2}
cd "$(dirname "$0")/.."
cargo build --release --quiet
MESHD=$PWD/target/release/meshd
MESHCTL=$PWD/target/release/meshctl
WORK=$(mktemp -d /tmp/meshd-bench.XXXXXX)
A=mb-a; B=mb-b

cleanup() {
  set +e
  for ns in $A $B; do
    for p in $(ip netns pids $ns 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
    ip netns del $ns 2>/dev/null
  done
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
cleanup; WORK=$(mktemp -d /tmp/meshd-bench.XXXXXX)

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

# --- meshd ---
ip netns exec $A "$MESHD" init --name a --state-dir $WORK/a --socket $WORK/a.sock \
  --endpoint 198.51.100.1:51820 >$WORK/a.out 2>$WORK/a.log & disown
wait_for 20 grep -q "meshd join" $WORK/a.out
TOKEN=$(awk '/meshd join/{print $3}' $WORK/a.out)
ip netns exec $B "$MESHD" join "$TOKEN" --name b --state-dir $WORK/b --socket $WORK/b.sock \
  --endpoint 198.51.100.2:51820 >$WORK/b.out 2>$WORK/b.log & disown
wait_for 20 test -S $WORK/b.sock
MB=$(ip netns exec $B "$MESHCTL" --socket $WORK/b.sock status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["self"]["mesh_ip"])')
wait_for 20 ip netns exec $A ping -c1 -W1 $MB

# --- wireguard-go ---
umask 077
wg genkey >$WORK/ka; wg genkey >$WORK/kb
PA=$(wg pubkey <$WORK/ka); PB=$(wg pubkey <$WORK/kb)
export WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1
ip netns exec $A wireguard-go -f wga >$WORK/wg-a.log 2>&1 & disown
ip netns exec $B wireguard-go -f wgb >$WORK/wg-b.log 2>&1 & disown
wait_for 10 ip -n $A link show wga; wait_for 10 ip -n $B link show wgb
ip netns exec $A wg set wga private-key $WORK/ka listen-port 51821 peer $PB allowed-ips 10.99.0.2/32 endpoint 198.51.100.2:51821
ip netns exec $B wg set wgb private-key $WORK/kb listen-port 51821 peer $PA allowed-ips 10.99.0.1/32 endpoint 198.51.100.1:51821
ip -n $A addr add 10.99.0.1/24 dev wga; ip -n $B addr add 10.99.0.2/24 dev wgb
ip -n $A link set wga mtu 1420 up; ip -n $B link set wgb mtu 1420 up
wait_for 20 ip netns exec $A ping -c1 -W1 10.99.0.2

ip netns exec $B iperf3 -s -D -p 5201 >/dev/null
wait_for 10 ip netns exec $A bash -c "echo > /dev/tcp/198.51.100.2/5201"

tput_mbit() { # tput_mbit DEST
  ip netns exec $A iperf3 -c "$1" -p 5201 -t "$SECS" -J 2>/dev/null |
    python3 -c 'import json,sys; print("%.0f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e6))'
}
rtt_ms() { # rtt_ms DEST
  ip netns exec $A ping -q -c 200 -i 0.01 "$1" | awk -F/ '/^rtt/{print $5}'
}

echo "meshd $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores, ${SECS}s per run, $ROUNDS rounds"
declare -a T_M T_W R_M R_W
for r in $(seq 1 "$ROUNDS"); do
  T_M+=("$(tput_mbit "$MB")"); T_W+=("$(tput_mbit 10.99.0.2)")
  R_M+=("$(rtt_ms "$MB")");     R_W+=("$(rtt_ms 10.99.0.2)")
  echo "round $r: meshd ${T_M[-1]} Mbit/s ${R_M[-1]} ms | wireguard-go ${T_W[-1]} Mbit/s ${R_W[-1]} ms"
done
T_D=$(tput_mbit 198.51.100.2); R_D=$(rtt_ms 198.51.100.2)

python3 - "$T_D" "$R_D" "${T_M[*]}" "${T_W[*]}" "${R_M[*]}" "${R_W[*]}" <<'PY'
import sys, statistics as st
td, rd = float(sys.argv[1]), float(sys.argv[2])
tm, tw, rm, rw = ([float(x) for x in a.split()] for a in sys.argv[3:7])
m = lambda v: st.median(v)
print()
print(f"{'':24}{'meshd':>12}{'wireguard-go':>14}{'ratio':>8}{'no tunnel':>12}")
print(f"{'TCP throughput Mbit/s':24}{m(tm):>12.0f}{m(tw):>14.0f}{m(tm)/m(tw):>8.2f}{td:>12.0f}")
print(f"{'ping RTT avg ms':24}{m(rm):>12.3f}{m(rw):>14.3f}{m(rm)/m(rw):>8.2f}{rd:>12.3f}")
print("(medians over rounds; throughput ratio > 1 and RTT ratio < 1 favour meshd)")
PY
