#!/usr/bin/env bash
# Start an SGLang teacher on reserved GPUs, wait until it can score, print its URL.
#
#   scripts/launch_teacher.sh --model /root/Llama-3.1-70B-Instruct --gpus 6,7 --tp 2 --port 30000
#   scripts/launch_teacher.sh --model /root/Qwen3-32B --gpus 7 --detach --pid-file /tmp/teacher.pid
#   scripts/launch_teacher.sh --model /path/tiny --engine reference --gpus "" --port 30000   # CPU, no SGLang
#
# Foreground (default): the server runs until this script exits; Ctrl-C, `kill <script pid>` or any error
# stops the server it started (its own process group) and nothing else.
# --detach: wait until the server is healthy, write its PID to --pid-file, print the URL and exit 0,
# leaving the server running; stop it later with `kill -- -$(cat <pid-file>)`.
#
# Options (defaults in brackets):
#   --model PATH         model directory or hub id (required)
#   --gpus LIST          CUDA_VISIBLE_DEVICES for the teacher, e.g. 6,7; "" = inherit [inherit]
#   --tp N               tensor parallel size [number of --gpus, else 1]
#   --port N             [30000]        --host ADDR  bind address [0.0.0.0]
#   --mem-fraction F     SGLang --mem-fraction-static [0.85]
#   --context-length N   SGLang --context-length [model default]
#   --api-key KEY        require this key (clients send it as a Bearer token) [$XVOCAB_API_KEY]
#   --timeout S          seconds to wait for /health_generate [1800]
#   --log FILE           server log [./teacher-<port>.log]
#   --engine E           sglang | reference (slime-xvocab's CPU scoring server, for tests) [sglang]
#   --detach / --pid-file FILE
#   -- ARGS...           passed to the server unchanged (e.g. -- --dtype bfloat16 --quantization fp8)
set -euo pipefail

MODEL="" GPUS="__inherit__" TP="" PORT=30000 HOST=0.0.0.0 MEM=0.85 CTX="" API_KEY="${XVOCAB_API_KEY:-}"
TIMEOUT=1800 LOG="" ENGINE=sglang DETACH=0 PID_FILE="" EXTRA=()

die() { echo "launch_teacher: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --model) MODEL="$2"; shift 2 ;;
    --gpus) GPUS="$2"; shift 2 ;;
    --tp) TP="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --host) HOST="$2"; shift 2 ;;
    --mem-fraction) MEM="$2"; shift 2 ;;
    --context-length) CTX="$2"; shift 2 ;;
    --api-key) API_KEY="$2"; shift 2 ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    --log) LOG="$2"; shift 2 ;;
    --engine) ENGINE="$2"; shift 2 ;;
    --detach) DETACH=1; shift ;;
    --pid-file) PID_FILE="$2"; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[[ -n "$MODEL" ]] || die "--model is required"
LOG="${LOG:-./teacher-${PORT}.log}"

if [[ "$GPUS" != "__inherit__" ]]; then
  export CUDA_VISIBLE_DEVICES="$GPUS"
  if [[ -z "$TP" && -n "$GPUS" ]]; then
    IFS=, read -r -a _gpu_list <<< "$GPUS"
    TP=${#_gpu_list[@]}
  fi
fi
TP="${TP:-1}"

case "$ENGINE" in
  sglang)
    CMD=(python3 -m sglang.launch_server --model-path "$MODEL" --host "$HOST" --port "$PORT" --tp "$TP"
         --mem-fraction-static "$MEM" --chunked-prefill-size 4096)
    [[ -n "$CTX" ]] && CMD+=(--context-length "$CTX")
    ;;
  reference)
    CMD=(python3 -m slime_xvocab.teacher_server --model "$MODEL" --host "$HOST" --port "$PORT")
    [[ -n "$CTX" ]] && CMD+=(--context-length "$CTX")
    ;;
  *) die "--engine must be sglang or reference" ;;
esac
[[ -n "$API_KEY" ]] && CMD+=(--api-key "$API_KEY")
CMD+=("${EXTRA[@]}")

# The URL other machines use: the bind address, or this host's first address when bound to all.
if [[ "$HOST" == "0.0.0.0" ]]; then
  ADDR="$(hostname -I 2>/dev/null | awk '{print $1}')"
  ADDR="${ADDR:-127.0.0.1}"
else
  ADDR="$HOST"
fi
URL="http://${ADDR}:${PORT}"
HEALTH_URL="http://127.0.0.1:${PORT}/health_generate"
[[ "$HOST" != "0.0.0.0" ]] && HEALTH_URL="${URL}/health_generate"

SERVER_PID=""
stop_server() {
  # Stop only the process group this script started (the server and the workers it spawned).
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "launch_teacher: stopping teacher (pid $SERVER_PID)" >&2
    kill -TERM -- "-$SERVER_PID" 2>/dev/null || kill -TERM "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$SERVER_PID" 2>/dev/null || return 0; sleep 1; done
    kill -KILL -- "-$SERVER_PID" 2>/dev/null || kill -KILL "$SERVER_PID" 2>/dev/null || true
  fi
}
trap stop_server EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

SHOWN="${CMD[*]}"
[[ -n "$API_KEY" ]] && SHOWN="${SHOWN//"$API_KEY"/***}"
echo "launch_teacher: $SHOWN (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-<all>}), log $LOG" >&2
setsid "${CMD[@]}" > "$LOG" 2>&1 < /dev/null &
SERVER_PID=$!

CURL_AUTH=()
[[ -n "$API_KEY" ]] && CURL_AUTH=(-H "Authorization: Bearer $API_KEY")
deadline=$(( $(date +%s) + TIMEOUT ))
until curl -sf --max-time 10 "${CURL_AUTH[@]}" "$HEALTH_URL" > /dev/null 2>&1; do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "launch_teacher: the teacher exited during start-up; last lines of $LOG:" >&2
    tail -n 40 "$LOG" >&2
    exit 1
  fi
  if (( $(date +%s) > deadline )); then
    echo "launch_teacher: not healthy after ${TIMEOUT}s ($HEALTH_URL); last lines of $LOG:" >&2
    tail -n 40 "$LOG" >&2
    exit 1
  fi
  sleep 2
done

echo "launch_teacher: teacher ready (pid $SERVER_PID)" >&2
echo "$URL"
if (( DETACH )); then
  [[ -n "$PID_FILE" ]] && echo "$SERVER_PID" > "$PID_FILE"
  trap - EXIT
  exit 0
fi
wait "$SERVER_PID"
