"""Checks of slime-xvocab against a real slime checkout, one per subprocess (driven by test_slime_compat.py).

Run as ``python tests/slime_compat_checks.py <check>`` with the slime checkout first on ``PYTHONPATH``; prints one
JSON object. Each check imports slime's own code from the checkout. Stubs, only for packages slime imports that
are not installed here and that the check does not exercise:

* ``wandb``: a module whose ``log`` records its payloads (it is the logger the metrics must reach);
* ``ray``: what slime's own ``tests/plugin_contracts`` install (``ray._private.services``), for the data source;
* ``megatron.core.mpu``: one process, no pipeline/context parallelism (``is_pipeline_last_stage`` True,
  world sizes 1, default process group), so ``slime.backends.megatron_utils.loss`` imports on a CPU box.

A real installed package always wins over a stub.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib
import importlib.util
import json
import os
import sys
import tempfile
import types
from typing import Any

RECORDED: list[dict] = []


def _missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def stub_wandb() -> None:
    """A recording ``wandb`` (or, if wandb is installed, its ``log`` replaced by the recorder)."""
    if _missing("wandb"):
        mod = types.ModuleType("wandb")
        mod.run = None
        mod.finish = lambda *a, **k: None
        sys.modules["wandb"] = mod
    import wandb

    wandb.log = lambda data, *a, **k: RECORDED.append(dict(data))


def stub_ray() -> None:
    if _missing("ray"):
        mod = types.ModuleType("ray")
        mod._private = types.SimpleNamespace(services=types.SimpleNamespace(get_node_ip_address=lambda: "127.0.0.1"))
        sys.modules["ray"] = mod


def stub_megatron() -> None:
    if not _missing("megatron"):
        return
    mpu = types.ModuleType("megatron.core.mpu")
    mpu.is_pipeline_last_stage = lambda *a, **k: True
    mpu.get_context_parallel_world_size = lambda: 1
    mpu.get_context_parallel_rank = lambda: 0
    mpu.get_data_parallel_group = lambda *a, **k: None
    core = types.ModuleType("megatron.core")
    core.mpu = mpu
    root = types.ModuleType("megatron")
    root.core = core
    sys.modules.update({"megatron": root, "megatron.core": core, "megatron.core.mpu": mpu})


def _slime_version() -> str:
    return "observability" if importlib.util.find_spec("slime.observability") else "utils"


# ---------------------------------------------------------------------------------------------- checks


def check_sample_fields() -> dict:
    """slime's ``Sample`` fields against the demo's stand-in: names, order and defaults."""
    from slime.utils.types import Sample as SlimeSample

    from slime_xvocab.demo.sample import Sample

    def described(cls: type) -> list[tuple[str, Any]]:
        out = []
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                default = f.default.value if hasattr(f.default, "value") else f.default
            else:
                made = f.default_factory()
                default = dataclasses.asdict(made) if dataclasses.is_dataclass(made) else made
            out.append((f.name, repr(default)))
        return out

    return {"slime": described(SlimeSample), "standin": described(Sample)}


def _sample_with_stats(rollout_id: int) -> Any:
    from slime.utils.types import Sample

    from slime_xvocab.metrics import sample_stats

    stats = sample_stats(
        {"student_tokens": 4, "teacher_tokens": 3, "chunks": 3, "one_to_one_fraction": 0.5, "covered_fraction": 1.0,
         "mean_chunk_width": 1.5, "max_chunk_width": 2, "unaligned_tokens": 0},
        latency_s=0.25, attempts=1,
    )
    return Sample(index=0, response_length=4, metadata={"xvocab": {"stats": stats, "rollout_id": rollout_id}})


def check_logging() -> dict:
    """``log_rollout_data`` on slime's logger: what reaches ``wandb.log`` and with which step."""
    stub_wandb()
    from slime_xvocab import hooks

    args = argparse.Namespace(
        use_wandb=True, use_tensorboard=False, wandb_always_use_train_step=True,
        rollout_batch_size=4, n_samples_per_prompt=8, global_batch_size=16,
    )
    result = hooks.log_rollout_data(3, args, [_sample_with_stats(3)], {}, 1.0)
    found = hooks.slime_logging()
    return {
        "layout": _slime_version(),
        "returned": result,
        "logger_module": found[0].__module__ if found else None,
        "recorded": RECORDED,
    }


def check_eval_reward() -> dict:
    """An eval sample whose dataset sets ``rm_type``: stock ``async_rm`` vs the plugin's reward hook."""
    from slime.rollout.rm_hub import async_rm
    from slime.rollout.sample_hooks import apply_rollout_sample_hooks
    from slime.utils.eval_config import EvalDatasetConfig
    from slime.utils.types import Sample

    from slime_xvocab import hooks

    out = {}
    for rm_type, response, label in (("math", "The answer is \\boxed{4}.", "4"), ("f1", "the cat sat", "the cat sat")):
        dataset = EvalDatasetConfig(name="aime", path="unused.jsonl", rm_type=rm_type)
        metadata = dataset.inject_metadata({"messages": [{"role": "user", "content": "2+2?"}]})

        def sample(response: str = response, label: str = label, metadata: dict = metadata) -> Any:
            # slime's eval path sets sample.custom_rm_path from the dataset config: None here.
            return Sample(index=0, prompt="2+2?", response=response, label=label, metadata=dict(metadata))

        base = dict(rm_type=None, custom_rm_path=None, reward_key=None, rm_url=None)
        stock = asyncio.run(async_rm(argparse.Namespace(**base), sample()))
        plugin_args = argparse.Namespace(**{
            **base,
            "custom_rm_path": "slime_xvocab.hooks.reward_func",
            "hf_checkpoint": "student-tokenizer-not-loaded-for-eval",
            "xvocab_teacher_tokenizer": "teacher-tokenizer-not-loaded-for-eval",
            "xvocab_teacher_urls": "http://127.0.0.1:9",
        })
        plugin_args.rollout_sample_hook_path = ["slime_xvocab.hooks.mark_evaluation"]

        async def generate_and_rm(sample: Any, args: Any = plugin_args) -> Any:
            # slime's generate_and_rm after generation: its sample hooks (told evaluation=True), then async_rm,
            # which calls the plugin as --custom-rm-path.
            sample = await apply_rollout_sample_hooks(args, sample, evaluation=True)
            return await async_rm(args, sample)

        via_slime = asyncio.run(generate_and_rm(sample()))
        out[rm_type] = {"stock": stock, "plugin": via_slime, "metadata_rm_type": metadata.get("rm_type")}
        hooks.reset()
    return out


HOOK_PATHS = {
    "custom_rm_path": "slime_xvocab.hooks.reward_func",
    "custom_reward_post_process_path": "slime_xvocab.hooks.post_process_rewards",
    "custom_rollout_log_function_path": "slime_xvocab.hooks.log_rollout_data",
    "rollout_sample_hook_path": "slime_xvocab.hooks.mark_evaluation",
    "data_source_path": "slime_xvocab.data_source.MessagesDataSource",
}


def check_hook_loading() -> dict:
    """Every hook path resolved by slime's own ``load_function``: parameter names and kinds."""
    import inspect

    stub_ray()
    from slime.utils.misc import load_function

    out = {}
    for flag, path in HOOK_PATHS.items():
        fn = load_function(path)
        target = fn.__init__ if inspect.isclass(fn) else fn
        out[flag] = {
            "params": [[p.name, p.kind.name] for p in inspect.signature(target).parameters.values()],
            "coroutine": inspect.iscoroutinefunction(fn),
        }
    return out


def check_data_source() -> dict:
    """``MessagesDataSource`` built by slime's path loader on slime's minimal contract args, and on a real file."""
    stub_ray()
    from slime.utils.misc import load_function

    cls = load_function("slime_xvocab.data_source.MessagesDataSource")
    minimal = type("Args", (), {"rollout_global_dataset": False, "buffer_filter_path": None,
                                "n_samples_per_prompt": 2})()
    groups = cls(minimal).get_samples(1)
    return {"base": [c.__name__ for c in cls.__mro__][:3], "groups": len(groups),
            "group_size": len(groups[0]) if groups else 0}


def check_advantages() -> dict:
    """slime's own ``compute_advantages_and_returns`` on the values the plugin leaves at unscored positions.

    Four samples of eight response tokens, pure distillation (reward 0, GRPO, ``--opd-kl-coef 1``). Unscored
    positions (the plugin's ``keep`` fills them with the rollout log-prob) are positions 2 and 5 of every sample
    and the whole of sample 3 (a fallback). Megatron's recomputed log-probs are the rollout ones plus a
    train/inference mismatch drawn from N(0, sigma). Reported per setting: the largest |advantage| at unscored
    positions that are still in the loss (``loss_mask`` 1), and the mismatch itself.
    """
    stub_megatron()
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        store = os.path.join(tempfile.mkdtemp(), "store")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    from slime.backends.megatron_utils.loss import compute_advantages_and_returns

    g = torch.Generator().manual_seed(0)
    n, length, sigma = 4, 8, 0.05
    rollout = [-torch.rand(length, generator=g) * 3 for _ in range(n)]
    mismatch = [torch.randn(length, generator=g) * sigma for _ in range(n)]
    megatron = [r + e for r, e in zip(rollout, mismatch, strict=True)]
    unscored = [torch.zeros(length, dtype=torch.bool) for _ in range(n)]
    for u in unscored[:3]:
        u[[2, 5]] = True
    unscored[3][:] = True
    teacher = [torch.where(u, r, -torch.rand(length, generator=g) * 3) for u, r in zip(unscored, rollout, strict=True)]

    results = {}
    for use_rollout in (True, False):
        for policy in ("keep", "mask"):
            for normalize in (False, True):
                masks = [(~u).float() if policy == "mask" else torch.ones(length) for u in unscored]
                data = {
                    "log_probs": [m.clone() for m in megatron],
                    "rollout_log_probs": [r.clone() for r in rollout],
                    "ref_log_probs": [m.clone() for m in megatron],
                    "teacher_log_probs": [t.clone() for t in teacher],
                    "rewards": [0.0] * n,
                    "values": None,
                    "response_lengths": [length] * n,
                    "total_lengths": [length + 5] * n,
                    "loss_masks": masks,
                }
                args = argparse.Namespace(
                    use_rollout_logprobs=use_rollout, kl_coef=0.0, kl_loss_type="low_var_kl",
                    advantage_estimator="grpo", custom_advantage_function_path=None, use_opd=True,
                    opd_type="sglang", opd_kl_coef=1.0, normalize_advantages=normalize,
                )
                compute_advantages_and_returns(args, data)
                advantages = data["advantages"]
                in_loss = [a[u & (m > 0)] for a, u, m in zip(advantages, unscored, masks, strict=True)]
                flat = torch.cat(in_loss)
                key = f"use_rollout_logprobs={use_rollout},unscored={policy},normalize_advantages={normalize}"
                results[key] = {
                    "unscored_tokens_in_loss": int(flat.numel()),
                    "max_abs_advantage_unscored": float(flat.abs().max()) if flat.numel() else 0.0,
                }
    all_mismatch = torch.cat([e[u] for e, u in zip(mismatch, unscored, strict=True)])
    return {"sigma": sigma, "max_abs_mismatch_unscored": float(all_mismatch.abs().max()), "settings": results}


CHECKS = {
    "hook_loading": check_hook_loading,
    "sample_fields": check_sample_fields,
    "logging": check_logging,
    "eval_reward": check_eval_reward,
    "data_source": check_data_source,
    "advantages": check_advantages,
}


if __name__ == "__main__":
    try:
        result = CHECKS[sys.argv[1]]()
    except ModuleNotFoundError as exc:  # a dependency of slime's module that this environment lacks
        if (exc.name or "").split(".")[0] in ("slime", "slime_xvocab"):
            raise
        result = {"skip": f"slime's code needs {exc.name!r}, not installed here: {exc}"}
    print("SLIME_COMPAT_RESULT " + json.dumps(result, default=str))
