#!/usr/bin/env bash
# TCP throughput, ping latency, CPU and memory of meshd's tunnel against every userspace peer we
# know (wireguard-go, boringtun-cli, gotatun-cli, nebula), over the same pair of network
# namespaces, in one invocation.
#
#   [mb-a] 198.51.100.1 ---veth (MTU 1500)--- 198.51.100.2 [mb-b]
#     meshd          mesh0 10.210.x.1 <-> 10.210.y.1   UDP 51820
#     wireguard-go   wgoa  10.91.0.1  <-> 10.91.0.2    UDP 51821
#     boringtun-cli  btna  10.92.0.1  <-> 10.92.0.2    UDP 51822
#     gotatun-cli    gtna  10.93.0.1  <-> 10.93.0.2    UDP 51823
#     nebula         nebA  10.94.0.1  <-> 10.94.0.2    UDP 51824
# (every interface name distinct: the WireGuard UAPI socket /var/run/wireguard/NAME.sock is not
# per namespace). Every tunnel runs at MTU 1420.
#
# Usage (as root): benches/throughput.sh [seconds per run, default 10] [rounds, default 3]
# MESHD_B=/path/to/another/meshd adds a row for that build (its own mesh 10.211.0.0/16, port
# 51830, TUN meshb0) beside this tree's, for an A/B in the same run.
# Needs: iperf3, wireguard-tools, wireguard-go, nebula (Debian packages); boringtun-cli and
# gotatun-cli from crates.io (`cargo install --locked boringtun-cli gotatun-cli`; the latter
# installs `gotatun`). A peer that is
# not installed is left out of the table (and said so). Builds meshd --release.
#
# Per round and tunnel, one after another (so noise hits all alike): TCP with 1 stream and with 4
# (iperf3, a -> b), idle ping p50/p99 (500 pings, 5 ms apart), ping p50/p99 during a 1-stream
# transfer, the tunnel processes' CPU (both ends, from /proc, during the 1-stream run; how much of
# it in the kernel) and their RSS (the larger end, after the round). Prints the medians and
# ratios against meshd, and meshd's floor per core: its kernel time plus the crypto for what it
# carried (benches/crypto.rs, measured first), as if it did nothing else. Each round
# also measures the latency floor: a UDP round trip between two plain processes over the same
# veth (benches/udp_echo.rs), what waking processes costs on this machine before any tunnel.
set -euo pipefail
SECS=${1:-10}
ROUNDS=${2:-3}
cd "$(dirname "$0")/.."
cargo build --release --quiet
cargo build --release --quiet --example udp_echo
# Sealing and opening one packet through meshd's session on one core, in microseconds: the
# crypto part of meshd's CPU at a given rate (benches/crypto.rs), measured before any tunnel runs.
read -r SEAL_US OPEN_US <<<"$(cargo bench --quiet --bench crypto --features testing -- --floor)"
ECHO=$PWD/target/release/examples/udp_echo
MESHD=$PWD/target/release/meshd
MESHCTL=$PWD/target/release/meshctl
A=mb-a; B=mb-b
WORK=

cleanup() {
  set +e
  for ns in $A $B; do
    for p in $(ip netns pids $ns 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
    ip netns del $ns 2>/dev/null
  done
  rm -f /var/run/wireguard/{wgoa,wgob,btna,btnb,gtna,gtnb}.sock
  [ -n "$WORK" ] && rm -rf "$WORK"
}
trap cleanup EXIT INT TERM
cleanup
WORK=$(mktemp -d /tmp/meshd-bench.XXXXXX)

ip netns add $A; ip netns add $B
ip link add veth-a netns $A type veth peer name veth-b netns $B
ip -n $A addr add 198.51.100.1/24 dev veth-a; ip -n $B addr add 198.51.100.2/24 dev veth-b
for ns in $A $B; do ip -n $ns link set lo up; done
ip -n $A link set veth-a up; ip -n $B link set veth-b up
ip netns exec $B "$ECHO" serve 198.51.100.2:9999 & disown

wait_for() { # wait_for SECONDS COMMAND...
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { echo "timed out: $*" >&2; return 1; }
    sleep 0.1
  done
}
# The pid of the newest process in namespace NS whose command is PROG.
ns_pid() { local p; for p in $(ip netns pids "$1"); do
  [ "$(cat /proc/$p/comm 2>/dev/null)" = "$2" ] && echo "$p"; done | tail -1; }

NAMES=(); declare -A DEST PIDS
add() { NAMES+=("$1"); DEST[$1]=$2; PIDS[$1]="$3 $4"; }

# --- meshd ---
ip netns exec $A "$MESHD" init --name a --state-dir $WORK/a --socket $WORK/a.sock \
  --endpoint 198.51.100.1:51820 >$WORK/a.out 2>$WORK/a.log & disown
wait_for 20 grep -q "meshd join" $WORK/a.out
TOKEN=$(awk '/meshd join/{print $3}' $WORK/a.out)
ip netns exec $B "$MESHD" join "$TOKEN" --name b --state-dir $WORK/b --socket $WORK/b.sock \
  --endpoint 198.51.100.2:51820 >$WORK/b.out 2>$WORK/b.log & disown
wait_for 20 test -S $WORK/b.sock
MB=$(ip netns exec $B "$MESHCTL" --socket $WORK/b.sock status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["self"]["mesh_ip"])')
wait_for 20 ip netns exec $A ping -c1 -W1 "$MB"
add meshd "$MB" "$(ns_pid $A meshd)" "$(ns_pid $B meshd)"

# --- another meshd build, for an A/B in the same run: MESHD_B=/path/to/meshd ---
if [ -n "${MESHD_B:-}" ]; then
  PA=$(ns_pid $A meshd); PB=$(ns_pid $B meshd)
  ip netns exec $A "$MESHD_B" init --name a2 --state-dir $WORK/a2 --socket $WORK/a2.sock \
    --port 51830 --tun meshb0 --cidr 10.211.0.0/16 --endpoint 198.51.100.1:51830 >$WORK/a2.out 2>$WORK/a2.log & disown
  wait_for 20 grep -q "meshd join" $WORK/a2.out
  TOKEN=$(awk '/meshd join/{print $3}' $WORK/a2.out)
  ip netns exec $B "$MESHD_B" join "$TOKEN" --name b2 --state-dir $WORK/b2 --socket $WORK/b2.sock \
    --port 51830 --tun meshb0 --endpoint 198.51.100.2:51830 >$WORK/b2.out 2>$WORK/b2.log & disown
  wait_for 20 test -S $WORK/b2.sock
  MB2=$(ip netns exec $B "$MESHCTL" --socket $WORK/b2.sock status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["self"]["mesh_ip"])')
  wait_for 20 ip netns exec $A ping -c1 -W1 "$MB2"
  # Its process: named like its file (the kernel keeps 15 characters), not the first meshd.
  COMM_B=$(basename "$MESHD_B"); COMM_B=${COMM_B:0:15}
  newest() { local p; for p in $(ip netns pids "$1"); do
    [ "$(cat /proc/$p/comm)" = "$COMM_B" ] && [ "$p" != "$2" ] && echo "$p"; done | tail -1; }
  add meshd-B "$MB2" "$(newest $A "$PA")" "$(newest $B "$PB")"
fi

# --- the WireGuard implementations driven by `wg set` ---
umask 077
wg_peer() { # wg_peer LABEL IFA IFB SUBNET PORT START_A START_B (START_*: the command, IF appended)
  local label=$1 ia=$2 ib=$3 net=$4 port=$5 sa=$6 sb=$7
  wg genkey >$WORK/$ia.key; wg genkey >$WORK/$ib.key
  local pa pb; pa=$(wg pubkey <$WORK/$ia.key); pb=$(wg pubkey <$WORK/$ib.key)
  ip netns exec $A $sa $ia >$WORK/$ia.log 2>&1 & disown
  ip netns exec $B $sb $ib >$WORK/$ib.log 2>&1 & disown
  wait_for 10 test -S /var/run/wireguard/$ia.sock && wait_for 10 test -S /var/run/wireguard/$ib.sock || {
    echo "$label did not start (see $WORK/$ia.log); left out" >&2; return 0; }
  ip netns exec $A wg set $ia private-key $WORK/$ia.key listen-port $port peer $pb allowed-ips $net.2/32 endpoint 198.51.100.2:$port
  ip netns exec $B wg set $ib private-key $WORK/$ib.key listen-port $port peer $pa allowed-ips $net.1/32 endpoint 198.51.100.1:$port
  ip -n $A addr add $net.1/24 dev $ia; ip -n $B addr add $net.2/24 dev $ib
  ip -n $A link set $ia mtu 1420 up; ip -n $B link set $ib mtu 1420 up
  wait_for 20 ip netns exec $A ping -c1 -W1 $net.2 || { echo "$label: no tunnel; left out" >&2; return 0; }
  local comm=${sa%% *}; comm=$(basename "$comm"); comm=${comm:0:15}
  add "$label" $net.2 "$(ns_pid $A "$comm")" "$(ns_pid $B "$comm")"
}
export WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1
# PEERS="wireguard-go nebula" measures only those beside meshd (default: every one installed).
want() { [ -z "${PEERS+x}" ] || [[ " $PEERS " == *" $1 "* ]]; }
have() { want "$1" && { command -v "$1" >/dev/null || { echo "$1 not installed; left out" >&2; return 1; }; }; }
if have wireguard-go; then wg_peer wireguard-go wgoa wgob 10.91.0 51821 "wireguard-go -f" "wireguard-go -f"; fi
if have boringtun-cli; then
  BT="boringtun-cli --foreground --disable-drop-privileges --log /dev/stderr"
  wg_peer boringtun-cli btna btnb 10.92.0 51822 "$BT" "$BT"
fi
if have gotatun; then
  GT="gotatun --foreground --disable-drop-privileges --verbosity error"
  wg_peer gotatun-cli gtna gtnb 10.93.0 51823 "$GT" "$GT"
fi

# --- nebula: its own certificates, no lighthouse, static hosts ---
if have nebula && have nebula-cert; then
  (cd $WORK && nebula-cert ca -name bench -out-crt ca.crt -out-key ca.key &&
   nebula-cert sign -ca-crt ca.crt -ca-key ca.key -name na -ip 10.94.0.1/24 -out-crt na.crt -out-key na.key &&
   nebula-cert sign -ca-crt ca.crt -ca-key ca.key -name nb -ip 10.94.0.2/24 -out-crt nb.crt -out-key nb.key) >/dev/null
  for side in a b; do
    if [ $side = a ]; then other=2 oth=198.51.100.2; else other=1 oth=198.51.100.1; fi
    cat >$WORK/neb-$side.yml <<EOF
pki: {ca: $WORK/ca.crt, cert: $WORK/n$side.crt, key: $WORK/n$side.key}
static_host_map: {"10.94.0.$other": ["$oth:51824"]}
lighthouse: {am_lighthouse: false, hosts: []}
listen: {host: 0.0.0.0, port: 51824}
punchy: {punch: false}
tun: {dev: neb$side, mtu: 1420}
logging: {level: warning}
firewall:
  outbound: [{port: any, proto: any, host: any}]
  inbound: [{port: any, proto: any, host: any}]
EOF
  done
  ip netns exec $A nebula -config $WORK/neb-a.yml >$WORK/neb-a.log 2>&1 & disown
  ip netns exec $B nebula -config $WORK/neb-b.yml >$WORK/neb-b.log 2>&1 & disown
  if wait_for 20 ip netns exec $A ping -c1 -W1 10.94.0.2; then
    add nebula 10.94.0.2 "$(ns_pid $A nebula)" "$(ns_pid $B nebula)"
  else echo "nebula: no tunnel (see $WORK/neb-a.log); left out" >&2; fi
fi

ip netns exec $B iperf3 -s -D -p 5201 >/dev/null
wait_for 10 ip netns exec $A bash -c "echo > /dev/tcp/198.51.100.2/5201"

TCK=$(getconf CLK_TCK)
ticks() { local t=0 p; for p in "$@"; do
  t=$((t + $(awk '{print $14 + $15}' /proc/$p/stat))); done; echo $t; }
# Only the time in the kernel (system time: TUN and socket calls, and the network stack's work
# done in them).
sys_ticks() { local t=0 p; for p in "$@"; do
  t=$((t + $(awk '{print $15}' /proc/$p/stat))); done; echo $t; }
rss_kb() { local m=0 p r; for p in "$@"; do
  r=$(awk '/^VmRSS/{print $2}' /proc/$p/status); [ "$r" -gt "$m" ] && m=$r; done; echo $m; }
tput_mbit() { # tput_mbit DEST STREAMS
  ip netns exec $A iperf3 -c "$1" -p 5201 -t "$SECS" -P "$2" -J 2>/dev/null |
    python3 -c 'import json,sys; print("%.0f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e6))'
}
pings() { # pings DEST COUNT -> "p50 p99" in ms
  ip netns exec $A ping -n -c "$2" -i 0.005 "$1" |
    python3 -c '
import sys, re
t = sorted(float(m.group(1)) for m in (re.search(r"time=([0-9.]+)", l) for l in sys.stdin) if m)
q = lambda f: t[min(len(t) - 1, int(f * len(t)))] if t else float("nan")
print(f"{q(0.50):.3f} {q(0.99):.3f}")'
}

echo "meshd $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores, ${SECS}s per run, $ROUNDS rounds: ${NAMES[*]}"
RES=$WORK/results; : >$RES
for r in $(seq 1 "$ROUNDS"); do
  for n in "${NAMES[@]}"; do
    d=${DEST[$n]}; read -r pa pb <<<"${PIDS[$n]}"
    t0=$(ticks $pa $pb); k0=$(sys_ticks $pa $pb); s0=$(date +%s.%N)
    t1=$(tput_mbit "$d" 1)
    t_end=$(ticks $pa $pb); k_end=$(sys_ticks $pa $pb); s_end=$(date +%s.%N)
    cpu=$(python3 -c "print(($t_end - $t0) / $TCK / ($s_end - $s0))")
    sys=$(python3 -c "print(($k_end - $k0) / $TCK / ($s_end - $s0))")
    t4=$(tput_mbit "$d" 4)
    read -r i50 i99 <<<"$(pings "$d" 500)"
    # Ping under load: a transfer in the background, pings meanwhile.
    ip netns exec $A iperf3 -c "$d" -p 5201 -t $((SECS < 5 ? SECS : 5)) >/dev/null 2>&1 &
    lp=$!; sleep 0.5
    read -r l50 l99 <<<"$(pings "$d" 300)"
    wait $lp || true
    rss=$(rss_kb $pa $pb)
    echo "$n $t1 $t4 $i50 $i99 $l50 $l99 $cpu $rss $sys" >>$RES
    printf 'round %d %-14s %6s / %6s Mbit/s  ping %s/%s ms  loaded %s/%s ms  cpu %.2f cores (%.2f kernel)  rss %.1f MB\n' \
      "$r" "$n" "$t1" "$t4" "$i50" "$i99" "$l50" "$l99" "$cpu" "$sys" "$(awk "BEGIN{print $rss/1024}")"
  done
  read -r f50 f99 <<<"$(ip netns exec $A "$ECHO" ping 198.51.100.2:9999 500 5 || echo nan nan)"
  echo "$f50 $f99" >>$WORK/floor
  printf 'round %d %-14s UDP round trip between two plain processes: %s/%s ms\n' "$r" floor "$f50" "$f99"
done
T_D=$(tput_mbit 198.51.100.2 1)

python3 - "$RES" "$T_D" "$WORK/floor" "$SEAL_US" "$OPEN_US" <<'PY'
import sys, statistics as st
rows = {}
for line in open(sys.argv[1]):
    n, *v = line.split()
    rows.setdefault(n, []).append([float(x) for x in v])
med = {n: [st.median(c) for c in zip(*v)] for n, v in rows.items()}
print()
print(f"{'':14}{'TCP 1':>8}{'TCP 4':>8}{'ping p50/p99':>15}{'loaded p50/p99':>17}{'RSS MB':>8}{'CPU':>6}{'kernel':>8}{'Mbit/s/core':>13}{'x meshd':>10}")
m1 = med.get("meshd", [float("nan")])[0]
for n, (t1, t4, i50, i99, l50, l99, cpu, rss, sys_) in med.items():
    per = t1 / cpu if cpu else float("nan")
    print(f"{n:14}{t1:>8.0f}{t4:>8.0f}{f'{i50:.3f}/{i99:.3f}':>15}{f'{l50:.3f}/{l99:.3f}':>17}{rss/1024:>8.1f}{cpu:>6.2f}{sys_:>8.2f}{per:>13.0f}{t1/m1:>10.2f}")
print(f"(medians over rounds; TCP in Mbit/s a->b; CPU: tunnel processes of both ends, in cores, during the 1-stream run, and of it in the kernel; no tunnel: {float(sys.argv[2]):.0f} Mbit/s)")
if "meshd" in med:
    # What meshd's CPU would be if it did nothing in user space but seal and open: its kernel
    # time plus the crypto for the packets it carried (TCP: 1,368 bytes of data per packet at
    # MTU 1420), each packet sealed once and opened once.
    t1, cpu, sys_ = med["meshd"][0], med["meshd"][6], med["meshd"][8]
    seal_us, open_us = float(sys.argv[4]), float(sys.argv[5])
    crypto = t1 * 1e6 / (1368 * 8) * (seal_us + open_us) * 1e-6
    print(f"meshd's floor per core: kernel {sys_:.2f} + crypto {crypto:.2f} cores (seal {seal_us:.3f} + open {open_us:.3f} us "
          f"per packet, benches/crypto.rs) of its {cpu:.2f} at {t1:.0f} Mbit/s: {t1 / (sys_ + crypto):.0f} Mbit/s per core "
          f"if meshd did nothing else in user space (measured: {t1 / cpu:.0f})")
fl = [st.median(c) for c in zip(*([float(x) for x in l.split()] for l in open(sys.argv[3])))]
print(f"latency floor (UDP round trip between two plain processes, no tunnel): {fl[0]:.3f}/{fl[1]:.3f} ms p50/p99")
if "meshd" in med:
    print(f"meshd idle ping / floor: {med['meshd'][2] / fl[0]:.2f}x p50, {med['meshd'][3] / fl[1]:.2f}x p99")
    for n in med:
        if n != "meshd":
            print(f"meshd / {n}: {m1 / med[n][0]:.2f}x single stream")
PY
