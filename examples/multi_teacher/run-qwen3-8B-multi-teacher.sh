#!/bin/bash
# Multi-teacher cross-vocabulary on-policy distillation on one 8-GPU node, three teachers, three tokenizers:
#   GPUs 0-5  slime, colocated: Qwen3-8B student rollouts (SGLang) and training (Megatron)
#   GPU  6    teacher "math": Llama-3.1-8B-Instruct or a math fine-tune of it (Llama-3 tokenizer) on SGLang, port 30001
#   GPU  7    teacher "chat": gemma-3-12b-it (Gemma-3 tokenizer) on SGLang, port 30002
#   remote    teacher "code": a DeepSeek-V3 endpoint served elsewhere, behind an API key
# Each sample's metadata["source"] picks its teacher (xvocab.yaml; docs/multi-teacher.md).
#
# usage: REMOTE_TEACHER_URL=https://teacher.example.com REMOTE_TEACHER_API_KEY=sk-... \
#        bash examples/multi_teacher/run-qwen3-8B-multi-teacher.sh
# The dataset's rows need a metadata column with "source" (dapo_math, gsm8k, codeforces, sharegpt, ...).
# Paths can be overridden from the environment: SLIME_DIR, MEGATRON_DIR, MODELS_DIR, DATA_DIR.

set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
XVOCAB_DIR="$(cd "${SCRIPT_DIR}/../.." && pwd)"
SLIME_DIR="${SLIME_DIR:-/root/slime}"
MEGATRON_DIR="${MEGATRON_DIR:-/root/Megatron-LM}"
MODELS_DIR="${MODELS_DIR:-/root}"
DATA_DIR="${DATA_DIR:-/root}"
: "${REMOTE_TEACHER_URL:?set REMOTE_TEACHER_URL to the remote code teacher, e.g. https://teacher.example.com}"
: "${REMOTE_TEACHER_API_KEY:?set REMOTE_TEACHER_API_KEY to its API key (never written to a file)}"

SLIME_GPUS="0,1,2,3,4,5"
MATH_GPU=6; MATH_PORT=30001   # must match the "math" entry of xvocab.yaml
CHAT_GPU=7; CHAT_PORT=30002   # must match the "chat" entry of xvocab.yaml
MATH_MODEL="${MODELS_DIR}/Llama-3.1-8B-Instruct"   # or a math fine-tune of it
CHAT_MODEL="${MODELS_DIR}/gemma-3-12b-it"
CODE_TOKENIZER="${MODELS_DIR}/DeepSeek-V3-tokenizer"   # a local copy of the remote model's tokenizer
PID_FILES=("$(mktemp /tmp/xvocab-teacher-math.XXXXXX)" "$(mktemp /tmp/xvocab-teacher-chat.XXXXXX)")
CONFIG="$(mktemp /tmp/xvocab-multi-teacher.XXXXXX)"   # xvocab.yaml with the remote teacher's real URL

# Stop only what this script started: the two teachers' process groups and the Ray head.
cleanup() {
  for f in "${PID_FILES[@]}"; do
    if [[ -s "$f" ]]; then
      kill -TERM -- "-$(cat "$f")" 2>/dev/null || true
    fi
    rm -f "$f"
  done
  rm -f "$CONFIG"
  ray stop --force > /dev/null 2>&1 || true
}
trap cleanup EXIT

# 1. The two local teachers, each on its reserved GPU; each waits for /health_generate, then stays up.
"${XVOCAB_DIR}/scripts/launch_teacher.sh" \
   --model "${MATH_MODEL}" --gpus "${MATH_GPU}" --tp 1 --port "${MATH_PORT}" \
   --mem-fraction 0.85 --context-length 32768 \
   --log /tmp/xvocab-teacher-math.log --detach --pid-file "${PID_FILES[0]}"
"${XVOCAB_DIR}/scripts/launch_teacher.sh" \
   --model "${CHAT_MODEL}" --gpus "${CHAT_GPU}" --tp 1 --port "${CHAT_PORT}" \
   --mem-fraction 0.85 --context-length 32768 \
   --log /tmp/xvocab-teacher-chat.log --detach --pid-file "${PID_FILES[1]}"

# 2. Preflight (seconds, CPU): every student/teacher pair on sample conversations, each live teacher probed.
#    The remote teacher gets its own run so its API key goes to it only.
python3 -m slime_xvocab.cli check \
   --student "${MODELS_DIR}/Qwen3-8B" --student-template-kwargs '{"enable_thinking": false}' \
   --teacher "${MATH_MODEL}" --teacher-url "http://127.0.0.1:${MATH_PORT}" \
   --teacher "${CHAT_MODEL}" --teacher-url "http://127.0.0.1:${CHAT_PORT}" \
   --data "${XVOCAB_DIR}/examples/data/check_sample.jsonl"
python3 -m slime_xvocab.cli check \
   --student "${MODELS_DIR}/Qwen3-8B" --student-template-kwargs '{"enable_thinking": false}' \
   --teacher "${CODE_TOKENIZER}" --teacher-url "${REMOTE_TEACHER_URL}" --api-key "${REMOTE_TEACHER_API_KEY}" \
   --data "${XVOCAB_DIR}/examples/data/check_sample.jsonl"

# 3. xvocab.yaml holds a placeholder URL for the remote teacher: train on a copy with the real one.
sed "s#https://teacher.example.com#${REMOTE_TEACHER_URL}#" "${SCRIPT_DIR}/xvocab.yaml" > "${CONFIG}"

export PYTHONUNBUFFERED=1

source "${SLIME_DIR}/scripts/models/qwen3-8B.sh"

CKPT_ARGS=(
   --hf-checkpoint "${MODELS_DIR}/Qwen3-8B"
   --ref-load "${MODELS_DIR}/Qwen3-8B_torch_dist"
   --load "${MODELS_DIR}/Qwen3-8B_xvocab/"
   --save "${MODELS_DIR}/Qwen3-8B_xvocab/"
   --save-interval 20
)

ROLLOUT_ARGS=(
   # Rows from several sources, each with metadata {"source": "dapo_math" | "gsm8k" | "codeforces" | ...}.
   --prompt-data "${DATA_DIR}/multi-source/train.jsonl"
   --input-key prompt
   --metadata-key metadata
   --label-key label
   --apply-chat-template
   --apply-chat-template-kwargs '{"enable_thinking": false}'
   --rollout-shuffle
   --num-rollout 300
   --rollout-batch-size 12
   --n-samples-per-prompt 4
   --rollout-max-response-len 8192
   # Stock SGLang scores teacher input tokens at temperature 1; the student samples at 1 too, and over the full
   # vocabulary (--rollout-top-p 1, slime's default), as the teacher is scored.
   --rollout-temperature 1

   --global-batch-size 48
   --balance-data
)

RM_ARGS=(
   # slime-xvocab's hooks, configured by xvocab.yaml (--custom-config-path sets every key on args).
   --custom-rm-path slime_xvocab.hooks.reward_func
   --custom-reward-post-process-path slime_xvocab.hooks.post_process_rewards
   --rollout-sample-hook-path slime_xvocab.hooks.mark_evaluation
   --custom-rollout-log-function-path slime_xvocab.hooks.log_rollout_data
   --custom-config-path "${CONFIG}"
   # Keeps each row's raw messages in sample.metadata["messages"] for the teachers' chat templates; the
   # row's metadata column (with its "source") lands in sample.metadata too, where the routes read it.
   --data-source-path slime_xvocab.data_source.MessagesDataSource
)

EVAL_ARGS=(
   # Eval samples are never sent to the teacher: they get the eval dataset's rm_type, else --rm-type.
   # --eval-interval 20
   # --eval-prompt-data aime "${DATA_DIR}/aime-2024/aime-2024.jsonl"
   # --n-samples-per-eval-prompt 16
   # --eval-max-response-len 8192
   # --eval-top-p 1
   # --rm-type deepscaler
)

PERF_ARGS=(
   --tensor-model-parallel-size 2
   --sequence-parallel
   --pipeline-model-parallel-size 1
   --context-parallel-size 1
   --expert-model-parallel-size 1
   --expert-tensor-parallel-size 1

   --recompute-granularity full
   --recompute-method uniform
   --recompute-num-layers 1

   --use-dynamic-batch-size
   --max-tokens-per-gpu 16384
)

GRPO_ARGS=(
   # Pure OPD: task rewards are 0 (xvocab_inner_rm_type: null), so A_t = -1.0 * (student_lp - teacher_lp).
   --advantage-estimator grpo
   --use-opd
   --opd-type sglang
   --opd-kl-coef 1.0
   # The OPD delta uses the rollout log-probs, which the plugin puts at positions without a teacher value:
   # their delta is then exactly 0 (without it, Megatron's recompute makes it the train/inference mismatch).
   --use-rollout-logprobs
   --use-kl-loss
   --kl-loss-coef 0.00
   --kl-loss-type low_var_kl
   --entropy-coef 0.00
)

OPTIMIZER_ARGS=(
   --optimizer adam
   --lr 1e-6
   --lr-decay-style constant
   --weight-decay 0.1
   --adam-beta1 0.9
   --adam-beta2 0.98
)

WANDB_ARGS=(
   # rollout/xvocab/* (coverage, chunk widths, teacher latency, fallbacks) land next to rollout/*.
   # --use-wandb
   # --wandb-project slime-xvocab
   # --wandb-group qwen3-8B-llama3.1-70B
)

SGLANG_ARGS=(
   --rollout-num-gpus-per-engine 1
   --sglang-mem-fraction-static 0.5
)

MISC_ARGS=(
   --attention-dropout 0.0
   --hidden-dropout 0.0
   --accumulate-allreduce-grads-in-fp32
   --attention-softmax-in-fp32
   --attention-backend flash
)

# 4. Ray sees only slime's six GPUs, so nothing it schedules can land on the teachers'. The remote teacher's
#    key reaches the rollout manager as REMOTE_TEACHER_API_KEY (its api_key_env in xvocab.yaml).
export MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
CUDA_VISIBLE_DEVICES="${SLIME_GPUS}" ray start --head --node-ip-address "${MASTER_ADDR}" --num-gpus 6 \
   --disable-usage-stats --dashboard-host=0.0.0.0 --dashboard-port=8265

RUNTIME_ENV_JSON="{
  \"env_vars\": {
    \"PYTHONPATH\": \"${MEGATRON_DIR}/:${XVOCAB_DIR}\",
    \"CUDA_DEVICE_MAX_CONNECTIONS\": \"1\",
    \"CUDA_VISIBLE_DEVICES\": \"${SLIME_GPUS}\",
    \"REMOTE_TEACHER_API_KEY\": \"${REMOTE_TEACHER_API_KEY}\"
  }
}"

cd "${SLIME_DIR}"
ray job submit --address="http://127.0.0.1:8265" \
   --runtime-env-json="${RUNTIME_ENV_JSON}" \
   -- python3 train.py \
   --actor-num-nodes 1 \
   --actor-num-gpus-per-node 6 \
   --rollout-num-gpus 6 \
   --colocate \
   "${MODEL_ARGS[@]}" \
   "${CKPT_ARGS[@]}" \
   "${ROLLOUT_ARGS[@]}" \
   "${OPTIMIZER_ARGS[@]}" \
   "${GRPO_ARGS[@]}" \
   "${WANDB_ARGS[@]}" \
   "${PERF_ARGS[@]}" \
   "${EVAL_ARGS[@]}" \
   "${SGLANG_ARGS[@]}" \
   "${MISC_ARGS[@]}" \
   "${RM_ARGS[@]}"
