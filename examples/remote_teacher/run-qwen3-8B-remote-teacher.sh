#!/bin/bash
# Cross-vocabulary OPD against a teacher served elsewhere: an SGLang endpoint (or sglang-router) reachable
# over HTTP, protected by an API key. All 8 local GPUs go to slime (Qwen3-8B student, colocated).
#
# usage: TEACHER_URL=https://teacher.example.com XVOCAB_API_KEY=... \
#        bash examples/remote_teacher/run-qwen3-8B-remote-teacher.sh
# The teacher tokenizer must be the served model's; TEACHER_TOKENIZER points at a local copy of it.
# Paths can be overridden from the environment: SLIME_DIR, MEGATRON_DIR, MODELS_DIR, DATA_DIR.

set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
XVOCAB_DIR="$(cd "${SCRIPT_DIR}/../.." && pwd)"
SLIME_DIR="${SLIME_DIR:-/root/slime}"
MEGATRON_DIR="${MEGATRON_DIR:-/root/Megatron-LM}"
MODELS_DIR="${MODELS_DIR:-/root}"
DATA_DIR="${DATA_DIR:-/root}"
: "${TEACHER_URL:?set TEACHER_URL to the teacher endpoint, e.g. https://teacher.example.com}"
: "${XVOCAB_API_KEY:?set XVOCAB_API_KEY to the teacher API key (it is never written to a file)}"
TEACHER_TOKENIZER="${TEACHER_TOKENIZER:-${MODELS_DIR}/Llama-3.1-70B-Instruct}"

# Stop only what this script started: the Ray head.
trap 'ray stop --force > /dev/null 2>&1 || true' EXIT

# 1. Preflight (seconds, CPU): tokenizers, chat templates, and the remote teacher answering correctly.
python3 -m slime_xvocab.cli check \
   --student "${MODELS_DIR}/Qwen3-8B" --teacher "${TEACHER_TOKENIZER}" \
   --student-template-kwargs '{"enable_thinking": false}' \
   --data "${XVOCAB_DIR}/examples/data/check_sample.jsonl" \
   --teacher-url "${TEACHER_URL}" --api-key "${XVOCAB_API_KEY}"

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
   --rollout-batch-size 16
   --n-samples-per-prompt 4
   --rollout-max-response-len 8192
   # Stock SGLang scores teacher input tokens at temperature 1; the student samples at 1 too, and over the full
   # vocabulary (--rollout-top-p 1, slime's default), as the teacher is scored.
   --rollout-temperature 1

   --global-batch-size 64
   --balance-data
)

RM_ARGS=(
   # slime-xvocab's hooks, configured by xvocab.yaml (--custom-config-path sets every key on args).
   --custom-rm-path slime_xvocab.hooks.reward_func
   --custom-reward-post-process-path slime_xvocab.hooks.post_process_rewards
   --rollout-sample-hook-path slime_xvocab.hooks.mark_evaluation
   --custom-rollout-log-function-path slime_xvocab.hooks.log_rollout_data
   --custom-config-path "${SCRIPT_DIR}/xvocab.yaml"
   # The teacher's URL, tokenizer and API key come from the environment (see RUNTIME_ENV_JSON).
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
   # --wandb-group qwen3-8B-remote-teacher
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

# 2. Ray gets all 8 GPUs. XVOCAB_* variables reach slime's rollout manager through the runtime env and
#    override xvocab.yaml there (the API key stays out of files and out of the logged config).
export MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
ray start --head --node-ip-address "${MASTER_ADDR}" --num-gpus 8 \
   --disable-usage-stats --dashboard-host=0.0.0.0 --dashboard-port=8265

RUNTIME_ENV_JSON="{
  \"env_vars\": {
    \"PYTHONPATH\": \"${MEGATRON_DIR}/:${XVOCAB_DIR}\",
    \"CUDA_DEVICE_MAX_CONNECTIONS\": \"1\",
    \"XVOCAB_TEACHER_URLS\": \"${TEACHER_URL}\",
    \"XVOCAB_TEACHER_TOKENIZER\": \"${TEACHER_TOKENIZER}\",
    \"XVOCAB_API_KEY\": \"${XVOCAB_API_KEY}\"
  }
}"

cd "${SLIME_DIR}"
ray job submit --address="http://127.0.0.1:8265" \
   --runtime-env-json="${RUNTIME_ENV_JSON}" \
   -- python3 train.py \
   --actor-num-nodes 1 \
   --actor-num-gpus-per-node 8 \
   --rollout-num-gpus 8 \
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
