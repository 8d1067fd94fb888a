#!/usr/bin/env bash
# Start N teacher replicas on N GPU sets with sglang-router in front; print the router's URL.
#
#   scripts/launch_teacher_router.sh --model /root/Qwen3-32B --gpu-sets "4,5 6,7" --port 30000
#   scripts/launch_teacher_router.sh --model /root/Qwen3-32B --gpu-sets "6 7" --detach --pid-file /tmp/teachers.pids
#
# Replica i runs on GPU set i (tensor parallel = size of the set) at port base+1+i via launch_teacher.sh;
# the router listens on --port and balances requests over the healthy replicas (cache-aware by default,
# so the samples of one prompt group reuse that replica's prompt cache). Point xvocab_teacher_urls at the
# router URL. Foreground (default): Ctrl-C or exit stops the router and the replicas this script started,
# and nothing else. --detach: leave them running and write their PIDs (one per line) to --pid-file; stop
# them with `while read p; do kill -- -$p; done < <pid-file>`.
#
# Options (defaults in brackets):
#   --model PATH        (required)      --gpu-sets "A B ..." space-separated CUDA_VISIBLE_DEVICES lists (required)
#   --port N            router port [30000]; replicas use N+1, N+2, ...
#   --host ADDR         router bind address [0.0.0.0]
#   --policy P          cache_aware | round_robin | power_of_two | random [cache_aware]
#   --api-key KEY       required by the replicas and the router [$XVOCAB_API_KEY]
#   --timeout S         seconds to wait for each replica [1800]
#   --log-dir DIR       logs [./teacher-logs]
#   --engine E          sglang | reference [sglang]
#   --detach / --pid-file FILE
#   -- ARGS...          passed to every replica's server
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MODEL="" GPU_SETS="" PORT=30000 HOST=0.0.0.0 POLICY=cache_aware API_KEY="${XVOCAB_API_KEY:-}"
TIMEOUT=1800 LOG_DIR=./teacher-logs ENGINE=sglang DETACH=0 PID_FILE="" EXTRA=()

die() { echo "launch_teacher_router: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) MODEL="$2"; shift 2 ;;
    --gpu-sets) GPU_SETS="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --host) HOST="$2"; shift 2 ;;
    --policy) POLICY="$2"; shift 2 ;;
    --api-key) API_KEY="$2"; shift 2 ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    --log-dir) LOG_DIR="$2"; shift 2 ;;
    --engine) ENGINE="$2"; shift 2 ;;
    --detach) DETACH=1; shift ;;
    --pid-file) PID_FILE="$2"; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[[ -n "$MODEL" ]] || die "--model is required"
[[ -n "$GPU_SETS" ]] || die "--gpu-sets is required, e.g. \"4,5 6,7\" for two replicas with tp 2"
mkdir -p "$LOG_DIR"
read -r -a SETS <<< "$GPU_SETS"

PIDS=()
stop_all() {
  # Only what this script started: the router's and each replica's process group.
  for pid in "${PIDS[@]}"; do
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  done
  for _ in $(seq 1 30); do
    alive=0
    for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    (( alive )) || return 0
    sleep 1
  done
  for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}
trap stop_all EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

WORKERS=()
for i in "${!SETS[@]}"; do
  wport=$(( PORT + 1 + i ))
  pidf="$LOG_DIR/replica-$i.pid"
  args=(--model "$MODEL" --gpus "${SETS[$i]}" --port "$wport" --host 127.0.0.1 --engine "$ENGINE"
        --timeout "$TIMEOUT" --log "$LOG_DIR/replica-$i.log" --detach --pid-file "$pidf")
  [[ -n "$API_KEY" ]] && args+=(--api-key "$API_KEY")
  # Replicas start in parallel (loading weights dominates); each waits for its own health check.
  "$HERE/launch_teacher.sh" "${args[@]}" -- "${EXTRA[@]}" > "$LOG_DIR/replica-$i.url" &
done
wait_ok=1
for job in $(jobs -p); do wait "$job" || wait_ok=0; done
for i in "${!SETS[@]}"; do
  [[ -s "$LOG_DIR/replica-$i.pid" ]] && PIDS+=("$(cat "$LOG_DIR/replica-$i.pid")")
  WORKERS+=("http://127.0.0.1:$(( PORT + 1 + i ))")
done
(( wait_ok )) || die "a replica failed to start; see $LOG_DIR/replica-*.log"

ROUTER=(python3 -m sglang_router.launch_router --host "$HOST" --port "$PORT" --policy "$POLICY"
        --worker-urls "${WORKERS[@]}")
[[ -n "$API_KEY" ]] && ROUTER+=(--api-key "$API_KEY")
setsid "${ROUTER[@]}" > "$LOG_DIR/router.log" 2>&1 < /dev/null &
PIDS+=("$!")

deadline=$(( $(date +%s) + 120 ))
until curl -sf --max-time 5 "http://127.0.0.1:${PORT}/readiness" > /dev/null 2>&1; do
  kill -0 "${PIDS[-1]}" 2>/dev/null || { tail -n 40 "$LOG_DIR/router.log" >&2; die "the router exited"; }
  (( $(date +%s) < deadline )) || { tail -n 40 "$LOG_DIR/router.log" >&2; die "the router is not ready"; }
  sleep 1
done

ADDR="$HOST"
if [[ "$HOST" == "0.0.0.0" ]]; then
  ADDR="$(hostname -I 2>/dev/null | awk '{print $1}')"
  ADDR="${ADDR:-127.0.0.1}"
fi
echo "launch_teacher_router: ${#WORKERS[@]} replicas behind the router" >&2
echo "http://${ADDR}:${PORT}"
if (( DETACH )); then
  [[ -n "$PID_FILE" ]] && printf '%s\n' "${PIDS[@]}" > "$PID_FILE"
  trap - EXIT
  exit 0
fi
wait "${PIDS[-1]}"
