#!/usr/bin/env bash
# One edge under the load generator, by hand (issue 18's storm and idle measurements):
# nats-server and relay-metering on CPU 1, one relay-edge on CPU 0, the load generator on
# CPU 1. Prints the load generator's summary, the edge's upgrade/close counters and its
# commonest warnings; everything is kept in a temporary folder it names.
#
#   PAIRS=9000 bench/one_edge.sh                       # a reconnect storm of 9,000 pairs
#   PAIRS=9000 LOADGEN="--mode idle" bench/one_edge.sh # 18,000 idle sockets: KiB each
#   PAIRS=9000 EDGE_ARGS="--room-requests-in-flight 32" bench/one_edge.sh
#
# Ends the processes it started, by PID. Never part of CI.
set -u
PAIRS=${PAIRS:-8000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=$ROOT/.venv/bin/python
D=$(mktemp -d -t termrelay-one-edge-XXXX)
cd "$ROOT"
export GOMAXPROCS=${GOMAXPROCS:-2}
port() { $PY -c "from runtime.embedded_nats import free_port; print(free_port())"; }
NPORT=$(port); EPORT=$(port); MPORT=$(port)
taskset -c 1 "$ROOT/.venv/bin/nats-server" -a 127.0.0.1 -p "$NPORT" -js -sd "$D/nats" > "$D/nats.log" 2>&1 &
NPID=$!
EPID=; MPID=
# The edge first (it drops its lease and slots in NATS), then metering and nats-server.
trap '[ -n "$EPID" ] && kill $EPID 2>/dev/null && wait $EPID; kill $MPID $NPID 2>/dev/null; wait' EXIT
sleep 1
printf '[tiers.bench]\ncredits_per_window = -1\nmax_rooms = -1\nmax_sessions = -1\n' > "$D/tiers.toml"
taskset -c 1 $PY -m metering.cli --nats-url "nats://127.0.0.1:$NPORT" --tiers-file "$D/tiers.toml" > "$D/metering.log" 2>&1 &
MPID=$!
KEY=$($PY -c "
import asyncio
from tests.harness import make_account
print(asyncio.run(make_account('nats://127.0.0.1:$NPORT', tier='bench')).api_key)")
# No caps per client address: every socket comes from 127.0.0.1.
taskset -c 0 $PY -m edge.cli --nats-url "nats://127.0.0.1:$NPORT" --port "$EPORT" --edge-id bench-edge \
  --metrics-port "$MPORT" --auth required --tiers-file "$D/tiers.toml" --socket-rate-limit-per-s 0 \
  --address-socket-limit 0 --address-upgrades-per-s 0 --drain-grace-ms 0 --drain-ms 0 ${EDGE_ARGS:-} > "$D/edge.log" 2>&1 &
EPID=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$EPORT/readyz" > /dev/null && break; sleep 0.2; done
echo "logs in $D; edge pid $EPID, metrics on port $MPORT"
taskset -c 1 $PY -W ignore -m bench.loadgen --url "ws://127.0.0.1:$EPORT" --pairs "$PAIRS" ${LOADGEN:---mode storm} \
  --api-key "$KEY" --relay-pid "$EPID" --nats-pid "$NPID" --storm-timeout "${STORM_TIMEOUT:-90}" \
  --json "$D/report.json" > "$D/loadgen.log" 2>&1
tail -1 "$D/loadgen.log" | cut -c1-600
curl -s "http://127.0.0.1:$MPORT/metrics" | grep -E "^relay_(closes|upgrades|admission_refused|leases_lost)_total" | grep -v " 0.0$"
grep -E "WARNING|ERROR" "$D/edge.log" | cut -c25- | sed -E 's/room [^:]+:/room R:/' | sort | uniq -c | sort -rn | head -8
