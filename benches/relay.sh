#!/usr/bin/env bash
# TCP throughput and ping RTT between the same two meshd nodes, first relayed through a third
# member (UDP between the two is blocked with nftables), then direct (the block lifted: the
# pair moves to the direct path by itself), in one invocation.
#
#   [rl-r] 198.51.100.1 (relay)   [rl-a] 198.51.100.2   [rl-b] 198.51.100.3
#        \___________________________|_____________________/
#                           bridge br0 in [rl-br]
#
# Usage (as root): benches/relay.sh [seconds per run, default 10] [runs per path, default 3]
# Needs: iperf3, nftables, iproute2, python3 (Debian packages). Builds meshd --release.
# Prints each measurement, the medians and the ratio relayed / direct.
set -euo pipefail
SECS=${1:-10}
RUNS=${2:-3}
cd "$(dirname "$0")/.."
. benches/common.sh
cargo build --release --quiet
MESHD=$PWD/target/release/meshd
MESHCTL=$PWD/target/release/meshctl
NS=(rl-r rl-a rl-b)
BR=rl-br
WORK=""

cleanup() {
  set +e
  lab_down "${NS[@]}" $BR
  [ -n "$WORK" ] && rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
cleanup
WORK=$(mktemp -d /tmp/meshd-relay.XXXXXX)
lab_up $BR "${NS[@]}"
ctl() { # ctl NODE ARGS...
  local n=$1; shift
  ip netns exec rl-$n "$MESHCTL" --socket $WORK/$n.sock "$@"
}
path_to_b() { # a's path to b: direct | relayed | none
  ctl a status --json | python3 -c '
import json, sys
s = json.load(sys.stdin)
print(next((p.get("path") or "none" for p in s["peers"] if p["name"] == "b"), "none"))'
}
is_path() { [ "$(path_to_b)" = "$1" ]; }

# a drops all UDP to and from b: their only path is the relay.
ip netns exec rl-a nft -f - <<'EOF'
table ip blk {
  chain out { type filter hook output priority 0; ip daddr 198.51.100.3 meta l4proto udp drop; }
  chain in { type filter hook input priority 0; ip saddr 198.51.100.3 meta l4proto udp drop; }
}
EOF

ip netns exec rl-r "$MESHD" init --name r --state-dir $WORK/r --socket $WORK/r.sock \
  --endpoint 198.51.100.1:51820 >$WORK/r.out 2>$WORK/r.log & disown
wait_for 20 grep -q "meshd join" $WORK/r.out
TOKEN=$(awk '/meshd join/{print $3}' $WORK/r.out)
for n in a b; do
  ip netns exec rl-$n "$MESHD" join "$TOKEN" --name $n --state-dir $WORK/$n --socket $WORK/$n.sock \
    >$WORK/$n.out 2>$WORK/$n.log & disown
done
wait_for 30 test -S $WORK/b.sock
MB=$(ctl b status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["self"]["mesh_ip"])')
wait_for 60 is_path relayed
wait_for 20 ip netns exec rl-a ping -c1 -W1 "$MB"
ip netns exec rl-b iperf3 -s -D -p 5201 >/dev/null
wait_for 10 ip netns exec rl-a bash -c "echo > /dev/tcp/$MB/5201"

tput_mbit() {
  ip netns exec rl-a iperf3 -c "$MB" -p 5201 -t "$SECS" -J 2>/dev/null |
    python3 -c 'import json,sys; print("%.0f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e6))'
}
rtt_ms() {
  ip netns exec rl-a ping -q -c 200 -i 0.01 "$MB" | awk -F/ '/^rtt/{print $5}'
}
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

echo "meshd $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores, ${SECS}s per run, $RUNS runs per path"
declare -a T_R R_R T_D R_D
for r in $(seq 1 "$RUNS"); do
  is_path relayed || { echo "a's path to b is $(path_to_b), not relayed" >&2; exit 1; }
  T_R+=("$(tput_mbit)"); R_R+=("$(rtt_ms)")
  echo "relayed run $r: ${T_R[-1]} Mbit/s, ping ${R_R[-1]} ms"
done
ctl r netcheck | grep "relay for others"

ip netns exec rl-a nft delete table ip blk
START=$SECONDS
wait_for 90 is_path direct
echo "block lifted: direct after $((SECONDS - START)) s"
for r in $(seq 1 "$RUNS"); do
  is_path direct || { echo "a's path to b is $(path_to_b), not direct" >&2; exit 1; }
  T_D+=("$(tput_mbit)"); R_D+=("$(rtt_ms)")
  echo "direct run $r: ${T_D[-1]} Mbit/s, ping ${R_D[-1]} ms"
done

TR=$(median "${T_R[@]}"); TD=$(median "${T_D[@]}")
RR=$(median "${R_R[@]}"); RD=$(median "${R_D[@]}")
echo
echo "median TCP: relayed $TR Mbit/s, direct $TD Mbit/s: relayed/direct $(python3 -c "print(f'{$TR/$TD:.2f}')")"
echo "median ping: relayed $RR ms, direct $RD ms"
