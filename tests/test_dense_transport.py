"""Dense targets from the reward hook to the loss: the hook, the start-up checks, and slime's own data path.

slime's code runs from checkouts named in ``SLIME_XVOCAB_SLIME_CHECKOUTS`` (``os.pathsep``-separated, the
convention of tests/test_slime_compat.py); without it those cases are skipped. Each runs
tests/dense_transport_checks.py in a fresh process with the checkout first on ``PYTHONPATH``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from oracle_teacher import CanonicalTeacher, OracleServer, canonical_ids
from slime_standin import Sample, make_args, make_sample

from slime_xvocab import dense_transport, hooks
from slime_xvocab.assets import load_tokenizer, tokenizer_dir
from slime_xvocab.dense import DenseTargets
from slime_xvocab.dense_loss import TARGETS_ATTR, targets_of
from slime_xvocab.dense_transport import (
    DenseTransportError,
    attach_dense_targets,
    check_args,
    check_slime_code,
    collect,
    install_rollout_side,
    sample_targets,
    set_sample_targets,
)
from slime_xvocab.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
ENV_VAR = "SLIME_XVOCAB_SLIME_CHECKOUTS"
CHECKOUTS = [Path(p) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p.strip()]
PARAMS = ([pytest.param(p, id=p.name) for p in CHECKOUTS] if CHECKOUTS else
          [pytest.param(None, id="no-slime", marks=pytest.mark.skip(reason=f"{ENV_VAR} is not set"))])


def targets(n: int, mark: int) -> DenseTargets:
    return DenseTargets(np.full((n, 2), mark, dtype=np.int32), np.full((n, 2), -1.0, dtype=np.float32),
                        np.full(n, 0.1, dtype=np.float32), np.ones(n, dtype=bool))


# ---------------------------------------------------------------------------------------------- reward hook


def test_reward_func_keeps_the_targets_on_the_sample_and_post_process_collects_them():
    """Qwen3 student <- Llama-3.1 oracle teacher on loopback, through the public hooks."""
    qwen, llama = load_tokenizer("qwen3"), load_tokenizer("llama3_1")
    responses = {" the cat": 0.2, " the dog": 0.3, " there": 0.3, " then": 0.2}
    teacher = CanonicalTeacher(llama, responses, llama.convert_tokens_to_ids("<|eot_id|>"))
    messages = [{"role": "user", "content": "Say something."}]
    prompt = qwen.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    response = canonical_ids(qwen, " the cat") + [qwen.convert_tokens_to_ids("<|im_end|>")]
    sample = make_sample(Sample, prompt_ids=qwen.encode(prompt, add_special_tokens=False), response_ids=response,
                         rollout_log_probs=[-1.0] * len(response), metadata={"messages": messages}, index=0,
                         group_index=0)
    with OracleServer(teacher) as server:
        args = make_args(hf_checkpoint=str(tokenizer_dir("qwen3")),
                         xvocab_teacher_tokenizer=str(tokenizer_dir("llama3_1")), xvocab_teacher_urls=server.url,
                         xvocab_max_retries=0, xvocab_dense=True, xvocab_dense_top_k=8, xvocab_credit_mode="chunk")
        hooks.reset()
        try:
            asyncio.run(hooks.reward_func(args, sample))
            got = sample_targets(sample)
            assert got is not None and got.n == len(response) and got.k == 8 and got.valid.all()
            first = {qwen.decode([t]): round(float(np.exp(lp)), 6) for t, lp in zip(got.ids[0], got.log_probs[0])
                     if t >= 0}
            assert first == {" the": 0.5, " there": 0.3, " then": 0.2}
            assert sample.metadata["xvocab"]["stats"]["dense_valid"] == len(response)
            hooks.post_process_rewards(args, [sample])
            with dense_transport._PENDING.lock:
                assert dense_transport._PENDING.targets == [(got, len(sample.tokens))]
        finally:
            hooks.reset()


def test_a_sample_without_targets_cannot_be_collected():
    s = make_sample(Sample, prompt_ids=[1, 2], response_ids=[3], rollout_log_probs=[-1.0])
    with pytest.raises(DenseTransportError, match="no dense targets"):
        collect([s])
    set_sample_targets(s, targets(1, 0))
    collect([s])


# ---------------------------------------------------------------------------------------------- checks


def fake_rollout_module(calls_tensorize: bool = True, name: str = "tensorize_rollout_data_for_training"):
    """A module shaped like slime.ray.rollout (or like v0.3.0, which puts each rank's dict straight into Ray)."""
    module = types.ModuleType("fake_rollout")
    seen = []
    module.__dict__[name] = lambda rollout_data: seen.append(rollout_data)
    source = f'''
class RolloutManager:
    def _convert_samples_to_train_data(self, samples):
        return self._post_process_rewards(samples)

    def _split_train_data_by_dp(self, data):
        out = []
        for partition in data["partitions"]:
            rollout_data = {{"partition": partition}}
            for key in ("tokens", "response_lengths"):
                rollout_data[key] = [data[key][j] for j in partition]
            {name + "(rollout_data)" if calls_tensorize else "pass"}
            out.append(rollout_data)
        return out
'''
    exec(compile(source, "fake_rollout", "exec"), module.__dict__)
    return module, seen


def test_the_split_gives_each_rank_the_targets_of_its_partition():
    module, seen = fake_rollout_module()
    assert install_rollout_side(module) == "tensorize_rollout_data_for_training"
    assert install_rollout_side(module) == "tensorize_rollout_data_for_training"  # idempotent
    samples = []
    for i, n in enumerate([3, 1, 2]):
        s = make_sample(Sample, prompt_ids=[1], response_ids=list(range(n)), rollout_log_probs=[-1.0] * n)
        set_sample_targets(s, targets(n, i))
        samples.append(s)
    collect(samples)
    data = {"partitions": [[2, 0], [1]], "tokens": [s.tokens for s in samples],
            "response_lengths": [s.response_length for s in samples]}
    ranks = module.RolloutManager()._split_train_data_by_dp(data)
    assert [[int(t.ids[0, 0]) for t in r["xvocab_dense"]] for r in ranks] == [[2, 0], [1]]
    assert seen == ranks
    # A different sample list than the one collected: refused, not mismatched.
    data["response_lengths"] = [1, 1, 1]
    with pytest.raises(DenseTransportError, match="response_lengths"):
        module.RolloutManager()._split_train_data_by_dp(data)


def test_a_slime_without_the_per_rank_function_is_refused_at_start_up():
    module, _ = fake_rollout_module(calls_tensorize=False)
    with pytest.raises(ConfigError, match="Supported: slime v0.3.1"):
        check_slime_code(module)
    with pytest.raises(ConfigError, match="Supported"):
        check_slime_code(types.ModuleType("empty"))


def test_launch_flags_that_would_bypass_the_route_are_refused():
    args = types.SimpleNamespace(loss_type="policy_loss", custom_loss_function_path=None,
                                 rollout_data_postprocess_path=None,
                                 custom_reward_post_process_path="slime_xvocab.hooks.post_process_rewards",
                                 custom_convert_samples_to_train_data_path="mine.convert", context_parallel_size=2)
    problems = "\n".join(check_args(args))
    for flag in ("--loss-type", "--custom-loss-function-path", "--rollout-data-postprocess-path",
                 "--custom-convert-samples-to-train-data-path", "--context-parallel-size"):
        assert flag in problems
    with pytest.raises(ConfigError, match="xvocab_dense needs"):
        dense_transport.check_rollout_side(args)


# ---------------------------------------------------------------------------------------------- training side


def test_the_training_actor_attaches_targets_to_loss_masks_and_the_loss_reads_them():
    rollout_data = {"loss_masks": [torch.ones(3, dtype=torch.int), torch.ones(2, dtype=torch.int)],
                    "response_lengths": [3, 2], "total_lengths": [5, 4], "xvocab_dense": [targets(3, 7), targets(2, 9)]}
    attach_dense_targets(None, 0, rollout_data)
    assert "xvocab_dense" not in rollout_data  # slime's metric logging iterates every key
    batch = {k: rollout_data[k] for k in ("loss_masks", "response_lengths")}
    assert [int(t.ids[0, 0]) for t in targets_of(batch)] == [7, 9]
    assert getattr(rollout_data["loss_masks"][0], TARGETS_ATTR).n == 3


def test_the_training_actor_refuses_missing_or_mismatched_targets():
    masks = [torch.ones(3, dtype=torch.int)]
    with pytest.raises(DenseTransportError, match="no dense targets"):
        attach_dense_targets(None, 4, {"loss_masks": masks, "response_lengths": [3]})
    with pytest.raises(DenseTransportError, match="response length"):
        attach_dense_targets(None, 4, {"loss_masks": masks, "response_lengths": [3], "xvocab_dense": [targets(2, 0)]})


# ---------------------------------------------------------------------------------------------- slime's own code


@pytest.mark.parametrize("checkout", PARAMS)
def test_slimes_own_rollout_to_loss_path_carries_every_samples_targets(checkout):
    if not (checkout / "slime" / "__init__.py").exists():
        pytest.fail(f"{ENV_VAR} entry {checkout} is not a slime checkout")
    env = {k: v for k, v in os.environ.items() if not k.startswith("XVOCAB_")}
    env["PYTHONPATH"] = os.pathsep.join([str(checkout), str(ROOT), str(ROOT / "tests")])
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "dense_transport_checks.py")], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("DENSE_TRANSPORT_RESULT ")]
    assert proc.returncode == 0 and lines, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(lines[-1].split(" ", 1)[1])
    if "skip" in result:
        pytest.skip(result["skip"])
    if "refused" in result:  # an unsupported slime: refused at start-up, never silently dropped
        assert "Supported: slime v0.3.1" in result["refused"]
        return
    seen = [entry for rank in result["ranks"] for entry in rank]
    assert sorted(e["sample"] for e in seen) == list(range(6))  # every sample, once
    for e in seen:
        assert e["marker"] == e["sample"] and e["n"] == e["response_length"]


def test_samples_the_teacher_cannot_score_get_targets_with_no_valid_position_and_are_counted():
    from test_hooks import rollout, run_rollout, xargs

    from slime_xvocab.metrics import compute_rollout_metrics
    from slime_xvocab.teacher_server import free_port

    args = xargs(f"http://127.0.0.1:{free_port()}", xvocab_startup_probe=False, xvocab_max_failed_fraction=1.0,
                 xvocab_dense=True)
    hooks.reset()
    try:
        samples = run_rollout(args, rollout(Sample))
        late = rollout(Sample, 1)[0]  # never scored by the reward hook: the post-process fills it
        late.metadata["xvocab"] = {}
        hooks.post_process_rewards(args, samples + [late])
    finally:
        hooks.reset()
    for s in samples + [late]:
        got = sample_targets(s)
        assert got is not None and got.n == s.response_length and not got.valid.any()
    metrics = compute_rollout_metrics([s.metadata["xvocab"]["stats"] for s in samples])
    assert metrics["dense_valid_fraction"] == 0.0


def test_with_one_tokenizer_the_targets_are_the_teachers_top_k():
    qwen = load_tokenizer("qwen3")
    responses = {" the cat": 0.2, " the dog": 0.3, " there": 0.3, " then": 0.2}
    eot = qwen.convert_tokens_to_ids("<|im_end|>")
    teacher = CanonicalTeacher(qwen, responses, eot)
    messages = [{"role": "user", "content": "Say something."}]
    prompt = qwen.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    response = canonical_ids(qwen, " the cat") + [eot]
    sample = make_sample(Sample, prompt_ids=qwen.encode(prompt, add_special_tokens=False), response_ids=response,
                         rollout_log_probs=[-1.0] * len(response), metadata={"messages": messages}, index=0,
                         group_index=0)
    with OracleServer(teacher) as server:
        qwen_dir = str(tokenizer_dir("qwen3"))
        args = make_args(hf_checkpoint=qwen_dir, xvocab_teacher_tokenizer=qwen_dir, xvocab_teacher_urls=server.url,
                         xvocab_max_retries=0, xvocab_dense=True)
        hooks.reset()
        try:
            asyncio.run(hooks.reward_func(args, sample))
        finally:
            hooks.reset()
    got = sample_targets(sample)
    assert got.valid.all()
    first = {qwen.decode([t]): round(float(np.exp(lp)), 6) for t, lp in zip(got.ids[0], got.log_probs[0]) if t >= 0}
    assert first == {" the": 0.5, " there": 0.3, " then": 0.2}
