# Shared by the bench scripts (sourced, not run): namespaces on one bridge, their cleanup, and a
# bounded wait for a condition.

# lab_up BRIDGE_NS NS...: NS[i] gets eth0 198.51.100.(i+1)/24 on a bridge in BRIDGE_NS.
lab_up() {
  local br=$1 i=1 ns; shift
  ip netns add "$br"
  ip -n "$br" link add br0 type bridge
  ip -n "$br" link set br0 up
  for ns in "$@"; do
    ip netns add "$ns"
    ip link add eth0 netns "$ns" type veth peer name p$i netns "$br"
    ip -n "$br" link set p$i master br0
    ip -n "$br" link set p$i up
    ip -n "$ns" addr add 198.51.100.$i/24 dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    i=$((i + 1))
  done
}

# lab_down NS...: kill every process in the namespaces and remove them (quietly if absent).
lab_down() {
  local ns p
  for ns in "$@"; do
    for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null; done
    ip netns del "$ns" 2>/dev/null
  done
  return 0
}

# wait_for SECONDS COMMAND...: until COMMAND succeeds; exits the script when time runs out.
wait_for() {
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { echo "timed out: $*" >&2; exit 1; }
    sleep 0.2
  done
}
