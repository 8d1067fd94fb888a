#!/bin/bash
# Cross-vocabulary on-policy distillation on one 8-GPU node:
#   GPUs 0-5  slime, colocated: Qwen3-8B student rollouts (SGLang) and training (Megatron, TP 2 x DP 3)
#   GPUs 6-7  the teacher, Llama-3.1-70B-Instruct on SGLang (TP 2), started and stopped by this script
#
# usage: bash examples/qwen3-8B_llama3.1-70B-teacher/run-qwen3-8B-llama3.1-70B-teacher.sh
# Paths can be overridden from the environment: SLIME_DIR, MEGATRON_DIR, MODELS_DIR, DATA_DIR.

set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
XVOCAB_DIR="$(cd "${SCRIPT_DIR}/../.." && pwd)"
SLIME_DIR="${SLIME_DIR:-/root/slime}"
MEGATRON_DIR="${MEGATRON_DIR:-/root/Megatron-LM}"
MODELS_DIR="${MODELS_DIR:-/root}"
DATA_DIR="${DATA_DIR:-/root}"

SLIME_GPUS="0,1,2,3,4,5"
TEACHER_GPUS="6,7"
TEACHER_PORT=30000   # must match xvocab_teacher_urls in xvocab.yaml
TEACHER_PID_FILE="$(mktemp /tmp/xvocab-teacher.XXXXXX)"

# Stop only what this script started: the teacher's process group and the Ray head.
cleanup() {
  if [[ -s "$TEACHER_PID_FILE" ]]; then
    kill -TERM -- "-$(cat "$TEACHER_PID_FILE")" 2>/dev/null || true
  fi
  rm -f "$TEACHER_PID_FILE"
  ray stop --force > /dev/null 2>&1 || true
}
trap cleanup EXIT

# 1. The teacher, on its reserved GPUs; waits for /health_generate, then leaves it running.
"${XVOCAB_DIR}/scripts/launch_teacher.sh" \
   --model "${MODELS_DIR}/Llama-3.1-70B-Instruct" \
   --gpus "${TEACHER_GPUS}" --tp 2 --port "${TEACHER_PORT}" \
   --mem-fraction 0.85 --context-length 32768 \
   --log /tmp/xvocab-teacher.log \
   --detach --pid-file "${TEACHER_PID_FILE}"

# 2. Preflight (seconds, CPU): both tokenizers and chat templates align on sample conversations, and the
#    live teacher answers correctly. Stops here, before any GPU work, if something is off.
python3 -m slime_xvocab.cli check \
   --student "${MODELS_DIR}/Qwen3-8B" --teacher "${MODELS_DIR}/Llama-3.1-70B-Instruct" \
   --student-template-kwargs '{"enable_thinking": false}' \
   --data "${XVOCAB_DIR}/examples/data/check_sample.jsonl" \
   --teacher-url "http://127.0.0.1:${TEACHER_PORT}"

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
   --prompt-data "${DATA_DIR}/dapo-math-17k/dapo-math-17k.jsonl"
   --input-key prompt
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
   --custom-config-path "${SCRIPT_DIR}/xvocab.yaml"
   # Keeps each row's raw messages in sample.metadata["messages"] for the teacher's chat template.
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

# 3. Ray sees only slime's six GPUs, so nothing it schedules can land on the teacher's.
export MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
CUDA_VISIBLE_DEVICES="${SLIME_GPUS}" ray start --head --node-ip-address "${MASTER_ADDR}" --num-gpus 6 \
   --disable-usage-stats --dashboard-host=0.0.0.0 --dashboard-port=8265

RUNTIME_ENV_JSON="{
  \"env_vars\": {
    \"PYTHONPATH\": \"${MEGATRON_DIR}/:${XVOCAB_DIR}\",
    \"CUDA_DEVICE_MAX_CONNECTIONS\": \"1\",
    \"CUDA_VISIBLE_DEVICES\": \"${SLIME_GPUS}\"
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
