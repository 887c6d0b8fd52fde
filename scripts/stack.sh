#!/usr/bin/env bash
# The collector, Prometheus and Alertmanager on this machine, without Docker or Kubernetes:
# the Debian packages `prometheus` and `prometheus-alertmanager`, and .venv/bin/gradwatch
# (`make stack` sets both up). Arguments are passed on to the collector (e.g. --webhook-url URL).
# Ports: STACK_GRPC_PORT (8470), STACK_METRICS_PORT (8471), STACK_PROMETHEUS_PORT (9090),
# STACK_ALERTMANAGER_PORT (9093); STACK_READY_TIMEOUT (60 s) to come up. Generated configs and
# data live in a temporary folder, removed at exit. Ctrl-C or SIGTERM stops all three.
set -euo pipefail
cd "$(dirname "$0")/.."

grpc_port=${STACK_GRPC_PORT:-8470}
metrics_port=${STACK_METRICS_PORT:-8471}
prometheus_port=${STACK_PROMETHEUS_PORT:-9090}
alertmanager_port=${STACK_ALERTMANAGER_PORT:-9093}
ready_timeout_s=${STACK_READY_TIMEOUT:-60}
gradwatch=.venv/bin/gradwatch

for binary in prometheus prometheus-alertmanager; do
    if ! command -v "$binary" >/dev/null; then
        echo "stack: $binary is not installed (make stack installs it with apt-get)" >&2
        exit 1
    fi
done
if [ ! -x "$gradwatch" ]; then
    echo "stack: $gradwatch is missing (make stack creates it)" >&2
    exit 1
fi

workdir=$(mktemp -d "${TMPDIR:-/tmp}/gradwatch-stack.XXXXXX")
declare -A pids=()  # name -> pid

stop_all() {
    trap - EXIT INT TERM HUP
    local name deadline
    for name in "${!pids[@]}"; do
        kill -TERM "${pids[$name]}" 2>/dev/null || true
    done
    deadline=$((SECONDS + 10))
    for name in "${!pids[@]}"; do
        while kill -0 "${pids[$name]}" 2>/dev/null && ((SECONDS < deadline)); do
            sleep 0.1
        done
        if kill -0 "${pids[$name]}" 2>/dev/null; then
            kill -KILL "${pids[$name]}"
        fi
        wait "${pids[$name]}" 2>/dev/null || true
    done
    rm -rf "$workdir"
}
trap stop_all EXIT
trap 'echo; echo "stack: stopping"; exit 0' INT TERM HUP

# Prometheus and Alertmanager log to files (shown if they fail); the collector, whose log
# includes every alert it sends, logs here.
start() {  # NAME COMMAND...
    local name=$1
    shift
    if [ "$name" = collector ]; then
        "$@" &
    else
        "$@" >"$workdir/$name.log" 2>&1 &
    fi
    pids[$name]=$!
}

check_running() {  # exits if one of the three stopped, with the end of its log
    local name
    for name in "${!pids[@]}"; do
        if ! kill -0 "${pids[$name]}" 2>/dev/null; then
            echo "stack: $name stopped" >&2
            if [ -f "$workdir/$name.log" ]; then
                tail -n 20 "$workdir/$name.log" >&2
            fi
            exit 1
        fi
    done
}

cat >"$workdir/prometheus.yml" <<YAML
global:
  scrape_interval: 5s
  evaluation_interval: 5s
rule_files:
- $PWD/deploy/prometheus/gradwatch-rules.yml
alerting:
  alertmanagers:
  - static_configs:
    - targets: [127.0.0.1:$alertmanager_port]
scrape_configs:
- job_name: gradwatch
  static_configs:
  - targets: [127.0.0.1:$metrics_port]
YAML

# The Compose stack's Alertmanager config: add receivers there to be notified.
start alertmanager prometheus-alertmanager \
    --config.file=deploy/compose/alertmanager.yml --storage.path="$workdir/alertmanager" \
    --web.listen-address="127.0.0.1:$alertmanager_port" --cluster.listen-address=
start prometheus prometheus \
    --config.file="$workdir/prometheus.yml" --storage.tsdb.path="$workdir/prometheus" \
    --web.listen-address="127.0.0.1:$prometheus_port"
start collector "$gradwatch" collector \
    --grpc-address="127.0.0.1:$grpc_port" --metrics-address="127.0.0.1:$metrics_port" \
    --alertmanager-url="http://127.0.0.1:$alertmanager_port" "$@"

urls=("http://127.0.0.1:$metrics_port/healthz" "http://127.0.0.1:$prometheus_port/-/ready"
      "http://127.0.0.1:$alertmanager_port/-/ready")
deadline=$((SECONDS + ready_timeout_s))
until .venv/bin/python -c '
import sys, urllib.request
for url in sys.argv[1:]:
    urllib.request.urlopen(url, timeout=1).close()' "${urls[@]}" 2>/dev/null; do
    check_running
    if ((SECONDS >= deadline)); then
        echo "stack: not ready after ${ready_timeout_s} s (${urls[*]})" >&2
        exit 1
    fi
    sleep 0.5
done

cat <<TEXT
gradwatch stack ready (Ctrl-C stops it; configs and data in $workdir)
  collector gRPC  127.0.0.1:$grpc_port
  metrics         http://127.0.0.1:$metrics_port/metrics
  Prometheus      http://127.0.0.1:$prometheus_port  (alerts: /alerts, targets: /targets)
  Alertmanager    http://127.0.0.1:$alertmanager_port
Point an agent at it: GRADWATCH_COLLECTOR=127.0.0.1:$grpc_port python train.py
TEXT

# Until a signal (the trap exits) or one of the three stops by itself.
while true; do
    check_running
    sleep 0.5
done
