#!/usr/bin/env bash
# A fleet forming at once: N real meshd processes in network namespaces on one bridge, one init
# and N-1 joins started at the same moment (benches/scale.rs says what it measures).
#
#   [mt<pid>-scale-1] ... [mt<pid>-scale-N]   one namespace per node, eth0 198.51.100.1..N/24
#          \________ br0 in [mt<pid>-scale-hub] ________/
#
# Usage (as root): benches/scale.sh [N, default 100]
# Builds meshd in release mode. Removes every namespace and process it made when it ends.
set -euo pipefail
N=${1:-100}
cd "$(dirname "$0")/.."
# Each node takes a few file descriptors and two threads; a big fleet needs more than the
# default limits of a login shell.
ulimit -n 65536 2>/dev/null || true
exec cargo bench --quiet --bench scale -- "$N"
