"""Runs slime's own rollout-to-loss data path with the dense transport installed (one slime checkout).

Run by tests/test_dense_transport.py in a fresh process as ``python dense_transport_checks.py`` with a slime
checkout first on ``PYTHONPATH``. slime's ``slime.ray.rollout`` and ``slime.backends.megatron_utils.data`` are
imported for real; third-party packages this machine lacks (ray, sglang, megatron, ...) are replaced by inert
stand-ins only when the import fails, so every line of slime that the transport touches is slime's:
``RolloutManager._convert_samples_to_train_data`` (which calls the plugin's reward post-process),
``_split_train_data_by_dp`` with its per-rank tensorize function and ``build_dp_schedule``,
``process_rollout_data`` (training actor), and the training ``DataIterator``. Prints one line
``DENSE_TRANSPORT_RESULT <json>``.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import sys
import types

import numpy as np
import torch

#: Packages slime's modules on the path import that this machine may lack (stood in only when missing).
STUBBED = {"ray", "sglang", "sglang_router", "megatron", "transformer_engine", "wandb", "tensorboard", "pybase64",
           "ring_flash_attn", "flash_attn", "apex", "mbridge", "pylatexenc", "math_verify", "nvtx", "qwen_vl_utils"}


class _Anything:
    """Stands for any attribute of a missing package: callable, subclassable, usable as a decorator."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return args[0] if len(args) == 1 and callable(args[0]) and not kwargs else _Anything()

    def __getattr__(self, name):
        return _Anything()

    def __getitem__(self, key):
        return _Anything()

    def __iter__(self):
        return iter(())


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (_Anything,), {})


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Last on sys.meta_path: only modules no real finder found get a stand-in."""

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] not in STUBBED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        if spec.name == "ray":
            module.remote = lambda *a, **k: a[0] if a and not k else (lambda cls: cls)
            module.put = lambda obj, **kwargs: obj
            module.get = lambda obj, **kwargs: obj
        return module

    def exec_module(self, module):
        pass


def make_args(n_samples: int) -> argparse.Namespace:
    from slime_xvocab.assets import tokenizer_dir

    return argparse.Namespace(
        # slime's flags on the path (values as slime's defaults)
        advantage_estimator="grpo", rewards_normalization=True, grpo_std_normalization=True,
        n_samples_per_prompt=n_samples, rollout_batch_size=1, global_batch_size=n_samples,
        use_dynamic_batch_size=False, max_tokens_per_gpu=None, micro_batch_size=1, balance_data=False,
        balance_by_flops=False, rollout_top_p=1.0, use_rollout_routing_replay=False,
        rollout_data_transport="object-store", reward_key=None,
        custom_reward_post_process_path="slime_xvocab.hooks.post_process_rewards",
        custom_convert_samples_to_train_data_path=None,
        loss_type="custom_loss", custom_loss_function_path="slime_xvocab.dense_loss.dense_distill_loss",
        rollout_data_postprocess_path="slime_xvocab.dense_transport.attach_dense_targets",
        context_parallel_size=1,
        # the plugin's keys
        hf_checkpoint=str(tokenizer_dir("qwen3")), xvocab_teacher_tokenizer=str(tokenizer_dir("llama3_1")),
        xvocab_teacher_urls="http://127.0.0.1:1", xvocab_dense=True,
    )


def report(result: dict) -> None:
    print("DENSE_TRANSPORT_RESULT " + json.dumps(result))


def main() -> None:
    sys.meta_path.append(_StubFinder())
    try:
        import slime.ray.rollout as rollout
        from slime.backends.megatron_utils.data import DataIterator
        from slime.utils.data import process_rollout_data
        from slime.utils.misc import load_function
        from slime.utils.types import Sample
    except Exception as exc:  # this checkout needs more than the stand-ins give
        report({"skip": f"slime's modules do not import here: {type(exc).__name__}: {exc}"})
        return

    from slime_xvocab.dense import DenseTargets
    from slime_xvocab.dense_loss import targets_of
    from slime_xvocab.dense_transport import attach_dense_targets, install_rollout_side, set_sample_targets

    n_samples, dp_size = 6, 2
    args = make_args(n_samples)
    samples = []
    rng = np.random.default_rng(0)
    for i in range(n_samples):
        n = int(rng.integers(2, 7))
        s = Sample(index=i, group_index=0, prompt="p", tokens=list(range(3 + n)), response_length=n, reward=float(i),
                   rollout_log_probs=[-1.0] * n, status=Sample.Status.COMPLETED)
        s.rollout_id = i
        s.metadata = {"xvocab": {"failed": False}}
        s.teacher_log_probs = torch.full((n,), -0.5)
        marker = DenseTargets(np.full((n, 2), i, dtype=np.int32), np.full((n, 2), -1.0, dtype=np.float32),
                              np.full(n, i / 100, dtype=np.float32), np.ones(n, dtype=bool))
        set_sample_targets(s, marker)
        samples.append(s)

    from slime_xvocab.errors import ConfigError

    try:
        name = install_rollout_side(rollout)
    except ConfigError as exc:
        report({"refused": str(exc)})
        return
    manager_cls = rollout.RolloutManager
    manager = manager_cls.__new__(manager_cls)
    manager.args = args
    manager.custom_convert_samples_to_train_data_func = None
    manager.custom_reward_post_process_func = load_function(args.custom_reward_post_process_path)
    manager.train_parallel_config = {"dp_size": dp_size, "cp_size": 1, "vpp_size": 1,
                                     "microbatch_group_size_per_vp_stage": 1}
    data = manager._convert_samples_to_train_data(samples)
    refs = manager._split_train_data_by_dp(data)

    ranks = []
    for r in range(dp_size):
        rollout_data = process_rollout_data(args, refs, r, dp_size)
        attach_dense_targets(args, 0, rollout_data)
        assert "xvocab_dense" not in rollout_data
        seen = []
        it = DataIterator(rollout_data, rollout_data["micro_batch_indices"])
        for _ in rollout_data["micro_batch_indices"]:
            batch = it.get_next(["loss_masks", "response_lengths", "total_lengths", "sample_indices", "tokens"])
            for index, targets, length in zip(batch["sample_indices"], targets_of(batch), batch["response_lengths"]):
                seen.append({"sample": int(index), "marker": int(targets.ids[0, 0]), "n": targets.n,
                             "response_length": int(length)})
        ranks.append(seen)
    report({"wrapped": name, "ranks": ranks})


if __name__ == "__main__":
    main()
