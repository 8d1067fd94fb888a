"""slime's own ``loss_function`` dispatching to the plugin's dense loss (one slime checkout, one process).

Run by tests/test_dense_loss.py as ``python dense_loss_checks.py`` with a slime checkout first on
``PYTHONPATH``. Megatron's ``mpu`` is replaced by a one-process stand-in backed by a real gloo group (tensor,
context and data parallel size 1); everything else on the path is slime's: ``loss_function`` with
``--loss-type custom_loss`` (its ``load_function``, its ``sum_of_sample_mean``, its rescaling),
``policy_loss_function`` inside the plugin's loss, and the log-prob code it calls. Prints one line
``DENSE_LOSS_RESULT <json>``.
"""

from __future__ import annotations

import argparse
import json
import sys
import types

import numpy as np
import torch
import torch.distributed as dist
from dense_transport_checks import _StubFinder

from slime_xvocab.teacher_server import free_port


def install_mpu() -> None:
    """A megatron.core.mpu for one process: every parallel size 1, the groups a real one-rank gloo group."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    mpu = types.ModuleType("megatron.core.mpu")
    for name in ("tensor_model_parallel", "context_parallel", "data_parallel", "pipeline_model_parallel",
                 "expert_model_parallel"):
        setattr(mpu, f"get_{name}_world_size", lambda *a, **k: 1)
        setattr(mpu, f"get_{name}_rank", lambda *a, **k: 0)
        setattr(mpu, f"get_{name}_group", lambda *a, **k: dist.group.WORLD)
    mpu.get_virtual_pipeline_model_parallel_world_size = lambda: None
    mpu.is_pipeline_last_stage = lambda *a, **k: True
    core = types.ModuleType("megatron.core")
    core.mpu = mpu
    core.__path__ = []
    megatron = types.ModuleType("megatron")
    megatron.core = core
    megatron.__path__ = []
    sys.modules.update({"megatron": megatron, "megatron.core": core, "megatron.core.mpu": mpu})


class Args(argparse.Namespace):
    """slime's flags the loss path reads; a flag not set here reads as off (None)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return None


def make_args() -> Args:
    from slime_xvocab.assets import tokenizer_dir

    return Args(
        loss_type="custom_loss", custom_loss_function_path="slime_xvocab.dense_loss.dense_distill_loss",
        custom_reward_post_process_path="slime_xvocab.hooks.post_process_rewards",
        advantage_estimator="grpo", use_rollout_logprobs=False, eps_clip=0.2, eps_clip_high=0.28, eps_clip_c=None,
        use_opsm=False, get_mismatch_metrics=False, use_tis=False, entropy_coef=0.0, use_kl_loss=False,
        log_probs_chunk_size=-1, allgather_cp=False, rollout_temperature=1.0, rollout_top_p=1.0,
        calculate_per_token_loss=False, recompute_loss_function=False, kl_coef=0.0,
        hf_checkpoint=str(tokenizer_dir("qwen3")), xvocab_teacher_tokenizer=str(tokenizer_dir("llama3_1")),
        xvocab_teacher_urls="http://127.0.0.1:1", xvocab_dense=True, xvocab_dense_coef=0.5,
    )


def main() -> None:
    sys.meta_path.append(_StubFinder())
    install_mpu()
    try:
        from slime.backends.megatron_utils import loss as slime_loss
        from slime.backends.megatron_utils.cp_utils import get_sum_of_sample_mean
    except Exception as exc:
        print("DENSE_LOSS_RESULT " + json.dumps({"skip": f"slime's loss does not import here: {exc!r}"}))
        return

    from slime_xvocab.dense import DenseTargets
    from slime_xvocab.dense_loss import TARGETS_ATTR, dense_term

    rng = np.random.default_rng(0)
    vocab, k = 32, 4
    lengths = [(7, 4), (5, 3), (9, 6)]
    total = sum(t for t, _ in lengths)
    logits = torch.from_numpy(rng.normal(0, 2.0, size=(1, total, vocab))).float()
    unconcat, masks, targets = [], [], []
    for t, r in lengths:
        unconcat.append(torch.from_numpy(rng.integers(0, vocab, t)))
        mask = torch.ones(r, dtype=torch.int)
        mask[0] = 0  # a masked position: slime's reducer must skip it for both terms
        ids = np.stack([rng.choice(vocab, size=k, replace=False) for _ in range(r)]).astype(np.int32)
        p = rng.dirichlet(np.ones(k + 1), size=r)
        target = DenseTargets(ids, np.log(p[:, :k]).astype(np.float32), p[:, k].astype(np.float32),
                              np.ones(r, dtype=bool))
        setattr(mask, TARGETS_ATTR, target)
        masks.append(mask)
        targets.append(target)
    batch = {
        "unconcat_tokens": unconcat, "total_lengths": [t for t, _ in lengths],
        "response_lengths": [r for _, r in lengths], "loss_masks": masks,
        "advantages": [torch.from_numpy(rng.normal(size=r)).float() for _, r in lengths],
        "log_probs": [torch.from_numpy(-rng.random(r)).float() for _, r in lengths],
        "rollout_log_probs": [torch.from_numpy(-rng.random(r)).float() for _, r in lengths],
        "rollout_mask_sums": torch.tensor([float(m.sum()) for m in masks]),
    }
    args = make_args()

    got_logits = logits.clone().requires_grad_(True)
    loss, normalizer, log = slime_loss.loss_function(args, batch, 1, 3, got_logits)
    loss.backward()
    keys = log["keys"]
    values = log["values"].tolist()

    # The same by hand: slime's policy loss (policy_loss path of slime's own dispatcher) + 0.5 x dense.
    pg_args = make_args()
    pg_args.loss_type = "policy_loss"
    pg_logits = logits.clone().requires_grad_(True)
    pg_loss, _, pg_log = slime_loss.loss_function(pg_args, batch, 1, 3, pg_logits)
    reduce = get_sum_of_sample_mean(batch["total_lengths"], batch["response_lengths"], masks,
                                    batch["rollout_mask_sums"], False)
    dense = reduce(dense_term(logits, targets, batch["total_lengths"], batch["response_lengths"])["divergence"])
    rescale = 1 / 3  # slime's loss_function: x num_microbatches / step_global_batch_size x dp size
    print("DENSE_LOSS_RESULT " + json.dumps({
        "loss": float(loss.detach()), "policy_loss": float(pg_loss.detach()), "dense": float(dense) * rescale,
        "keys": keys, "values": values, "pg_keys": pg_log["keys"],
        "grad_finite": bool(torch.isfinite(got_logits.grad).all()), "grad_norm": float(got_logits.grad.norm()),
    }))


if __name__ == "__main__":
    main()
