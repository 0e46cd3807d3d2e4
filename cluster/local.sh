#!/usr/bin/env bash
# A real multi-node Ray cluster on one machine: a head and N worker nodes, each its own raylet started with
# `ray start`, the way nodes start on real machines. For development and for tests/test_cluster_jobs.py.
#
#   cluster/local.sh up [N]   head + N workers (default 1); prints the address and how to submit
#   cluster/local.sh down     stops this cluster's processes (and only this cluster's) and removes its state
#   cluster/local.sh status   `ray status` for this cluster
#   cluster/local.sh env      the export lines a shell needs to talk to it (eval "$(cluster/local.sh env)"):
#                             RAY_ADDRESS (GCS), RAY_API_SERVER_ADDRESS (Jobs CLI), RAY_DASHBOARD_ADDRESS
#                             (Serve CLI), RAY_AUTH_MODE=token
#
# Settings (environment):
#   AF3_CLUSTER_DIR       state and Ray temp dir (default /tmp/af3dist-cluster; keep it short: Ray puts
#                         unix sockets under it and socket paths are limited to 107 bytes)
#   AF3_CPUS_PER_NODE     logical CPUs per node, head included (default 2; logical: Ray schedules by them,
#                         the nodes still share this machine's cores)
#   AF3_OBJECT_STORE_MB   object store per node in MiB (default 512)
#   AF3_RAY_PORT          GCS port of the head (default 6379)
#   AF3_DASHBOARD_PORT    dashboard / Jobs API port, bound to 127.0.0.1 (default 8265)
#
# Token authentication is on (Ray 2.60's default for `ray start --head`): every command here runs with
# RAY_AUTH_MODE=token and the token from $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token
# (generated there if none exists). `down` does not run a bare `ray stop`, which would also kill every
# other Ray instance of this user on the machine: it ends only the processes under this cluster's dir.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -x "$ROOT/.venv/bin/ray" ]; then
  BIN="$ROOT/.venv/bin"
  export PATH="$BIN:$PATH"   # the nodes' job drivers then run `python` from the project venv
  RAY="$BIN/ray"
  PY="$BIN/python"
else
  RAY="$(command -v ray)" || { echo "local.sh: no ray (no .venv/bin/ray, none on PATH)" >&2; exit 1; }
  PY="$(command -v python3 || command -v python)"
fi

DIR="${AF3_CLUSTER_DIR:-/tmp/af3dist-cluster}"
TEMP="$DIR/ray"
STATE="$DIR/cluster.env"
CPUS="${AF3_CPUS_PER_NODE:-2}"
OBJ_MB="${AF3_OBJECT_STORE_MB:-512}"
export RAY_AUTH_MODE=token
export RAY_USAGE_STATS_ENABLED=0
# Small nodes keep their idle data workers, as a local instance does (af3dist/cluster.py, IDLE_WORKERS_KEPT):
# with Ray's default, a pause of the data plane beside fractional-CPU actors gets them killed and restarted.
export RAY_num_workers_soft_limit="${RAY_num_workers_soft_limit:-8}"
export AF3DIST_LOCAL_CLUSTER="$DIR"

# N distinct free ports: bound together, so that two of them can never be the same port (one at a time, the
# kernel may hand out a port it just released again: seen as "metrics_export is trying to use a port number
# ... that is used by other components").
free_ports() {
  "$PY" -c 'import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}

# pids of the processes that belong to this cluster: every process `ray start` spawns here (GCS, raylets,
# dashboard, agents, workers, drivers of submitted jobs) inherits AF3DIST_LOCAL_CLUSTER=<cluster dir>
cluster_pids() {
  "$PY" - "$DIR" <<'EOF'
import os, sys
marker = f"AF3DIST_LOCAL_CLUSTER={sys.argv[1]}".encode()
me = {os.getpid(), os.getppid()}
found = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read().split(b"\0")
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        continue
    if marker in env and int(pid) not in me and state != "Z":
        found.append(pid)
print(" ".join(found))
EOF
}

ensure_token() {
  if [ -n "${RAY_AUTH_TOKEN:-}" ] || [ -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]; then
    return
  fi
  "$RAY" get-auth-token --generate >/dev/null
}

print_env() {
  # shellcheck disable=SC1090
  . "$STATE"
  echo "export RAY_ADDRESS=$GCS_ADDRESS"                  # drivers started in this shell, ray status
  echo "export RAY_API_SERVER_ADDRESS=$DASHBOARD_URL"     # ray job submit/status/logs, ray list
  echo "export RAY_DASHBOARD_ADDRESS=$DASHBOARD_URL"      # serve deploy/status/shutdown
  echo "export RAY_AUTH_MODE=token"
  [ -n "${RAY_AUTH_TOKEN_PATH:-}" ] && echo "export RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH"
  return 0
}

up() {
  local n="${1:-1}"
  if [ -f "$STATE" ] && [ -n "$(cluster_pids)" ]; then
    echo "local.sh: a cluster is already running under $DIR (cluster/local.sh down first)" >&2
    exit 1
  fi
  rm -rf "$TEMP" "$STATE"
  mkdir -p "$TEMP"
  ensure_token
  local port="${AF3_RAY_PORT:-6379}" dash="${AF3_DASHBOARD_PORT:-8265}"
  local common=(--num-cpus "$CPUS" --object-store-memory $((OBJ_MB * 1024 * 1024)) --temp-dir "$TEMP"
                --node-ip-address 127.0.0.1 --disable-usage-stats)
  # Each raylet on this host needs its own agent ports; Ray picks the others itself.
  local client_port agent_port metrics_port
  read -r client_port agent_port metrics_port <<<"$(free_ports 3)"
  "$RAY" start --head --port "$port" "${common[@]}" --resources '{"af3_head": 1}' \
    --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$dash" \
    --ray-client-server-port "$client_port" --dashboard-agent-listen-port "$agent_port" \
    --metrics-export-port "$metrics_port" >"$DIR/head.log" 2>&1 \
    || { cat "$DIR/head.log" >&2; down; exit 1; }
  local gcs="127.0.0.1:$port"
  for i in $(seq 1 "$n"); do
    read -r agent_port metrics_port <<<"$(free_ports 2)"
    "$RAY" start --address "$gcs" "${common[@]}" --resources "{\"af3_worker_$i\": 1}" \
      --dashboard-agent-listen-port "$agent_port" --metrics-export-port "$metrics_port" \
      --include-log-monitor false >"$DIR/worker-$i.log" 2>&1 \
      || { cat "$DIR/worker-$i.log" >&2; down; exit 1; }
  done
  cat >"$STATE" <<EOF
GCS_ADDRESS=$gcs
DASHBOARD_URL=http://127.0.0.1:$dash
WORKERS=$n
EOF
  # wait until every node has registered
  local want=$((n + 1)) have=0
  for _ in $(seq 1 60); do
    have="$("$PY" - "$gcs" <<'EOF' 2>/dev/null || echo 0
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print(sum(1 for node in ray.nodes() if node["Alive"]))
EOF
)"
    [ "$have" = "$want" ] && break
    sleep 1
  done
  if [ "$have" != "$want" ]; then
    echo "local.sh: only $have of $want nodes registered; see $DIR/*.log and $TEMP/session_latest/logs" >&2
    down
    exit 1
  fi
  cat <<EOF
Ray cluster up: head + $n worker node(s), $CPUS CPU(s) each, token authentication on.
  GCS address (ray.init / RAY_ADDRESS inside the cluster): $gcs
  Dashboard and Jobs API: http://127.0.0.1:$dash
Submit a job from the repository root:
  eval "\$(cluster/local.sh env)"
  ray job submit --working-dir . --runtime-env cluster/runtime_env.local.yaml -- \\
      python -m ray_jobs.finetune --config tiny --output-dir /tmp/af3dist-runs/tiny
  ray job logs <submission id>      # or the dashboard, http://127.0.0.1:$dash
Deploy the Serve app (set proxy_location: HeadOnly in a copy of the config: the nodes here share one
host, so only one proxy can hold the HTTP port):
  serve deploy serving/serve_config.tiny.yaml
Stop it with: cluster/local.sh down
EOF
}

down() {
  local pids
  pids="$(cluster_pids)"
  if [ -n "$pids" ]; then
    # shellcheck disable=SC2086
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 1 20); do
      pids="$(cluster_pids)"
      [ -z "$pids" ] && break
      sleep 0.5
    done
    # shellcheck disable=SC2086
    [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
    sleep 0.5
    pids="$(cluster_pids)"
    if [ -n "$pids" ]; then
      echo "local.sh: still running after SIGKILL: $pids" >&2
      exit 1
    fi
  fi
  rm -rf "$TEMP" "$STATE" "$DIR"/head.log "$DIR"/worker-*.log
  rmdir "$DIR" 2>/dev/null || true
  echo "Ray cluster under $DIR stopped."
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) down ;;
  status) . "$STATE"; "$RAY" status --address "$GCS_ADDRESS" ;;
  env) print_env ;;
  *) sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
esac
