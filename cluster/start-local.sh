#!/usr/bin/env bash
# cluster/start-local.sh [extra `ray start` flags, e.g. --num-cpus 8 --num-gpus 1 --block]
#
# Starts a Ray head on this machine for ray-cai: dashboard and job server on 127.0.0.1 only,
# token authentication on. The token is $RAY_AUTH_TOKEN, the file at $RAY_AUTH_TOKEN_PATH, or
# ~/.ray/auth_token (created here when none of them exists). Prints the address and how to
# submit. Ports: $RAY_CAI_GCS_PORT (6379) and $RAY_CAI_DASHBOARD_PORT (8265).
# Stop it with `ray stop` (which stops every Ray process of yours on this machine), or Ctrl-C
# when started with --block.
set -euo pipefail

RAY="${RAY:-ray}"
GCS_PORT="${RAY_CAI_GCS_PORT:-6379}"
DASHBOARD_PORT="${RAY_CAI_DASHBOARD_PORT:-8265}"

if [[ -z "${RAY_AUTH_TOKEN:-}" && -z "${RAY_AUTH_TOKEN_PATH:-}" ]]; then
    "$RAY" get-auth-token --generate >/dev/null   # keeps an existing ~/.ray/auth_token
fi
export RAY_AUTH_MODE=token
# The raylet kills each worker's process group when the worker exits, so a vLLM engine's
# EngineCore and tensor-parallel workers (not Ray workers) end with their actor. Ray 2.60's
# default; set here so the head keeps it whatever the default becomes. An exported 0 wins.
export RAY_process_group_cleanup_enabled="${RAY_process_group_cleanup_enabled:-1}"

start=(
    "$RAY" start --head
    --node-ip-address 127.0.0.1 --port "$GCS_PORT"
    --include-dashboard true --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT"
    --disable-usage-stats
    "$@"
)

print_next_steps() {
    cat <<EOF

ray-cai head on 127.0.0.1 (token authentication on)
  job server / dashboard: http://127.0.0.1:${DASHBOARD_PORT}
  GCS address:            127.0.0.1:${GCS_PORT}
Submit a run:
  cai submit --address http://127.0.0.1:${DASHBOARD_PORT} -- generate --config configs/demo.yaml
  cai jobs list --address http://127.0.0.1:${DASHBOARD_PORT}
cai and ray read the token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token;
the dashboard in a browser asks for it (print it with: ray get-auth-token).
From another machine, tunnel instead of opening the port: ssh -L ${DASHBOARD_PORT}:127.0.0.1:${DASHBOARD_PORT} THIS_HOST
EOF
}

case " $* " in
    *" --block "*)
        print_next_steps
        exec "${start[@]}"
        ;;
esac
"${start[@]}"
print_next_steps
