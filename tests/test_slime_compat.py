"""Compatibility matrix: slime-xvocab against real slime checkouts (slime's own code, run at test time).

Point ``SLIME_XVOCAB_SLIME_CHECKOUTS`` at one or more slime source checkouts, separated by ``os.pathsep``
(e.g. ``/src/slime-main:/src/slime-v0.3.1``); without it every case here is skipped. Each case runs
``tests/slime_compat_checks.py`` in a fresh subprocess with the checkout first on ``PYTHONPATH`` (two slime
versions cannot share one process), or slime's own ``tests/plugin_contracts`` files pointed at the plugin's
hook paths. Covered per checkout:

* hook loading: every hook path resolved by slime's ``load_function``, with the parameters slime calls;
* ``Sample``: the demo stand-in has slime's exact field list (names, order, defaults);
* metrics: ``log_rollout_data`` reaches slime's logger (``slime.observability`` on main, ``slime.utils`` on
  v0.3.1 and earlier) with slime's ``rollout/step``;
* eval reward: an eval sample whose dataset sets ``rm_type`` (slime's ``EvalDatasetConfig``), run through slime's
  sample hooks and ``async_rm`` with the plugin as ``--custom-rm-path``, scores what stock ``async_rm`` scores;
* data source: built by slime's path loader on slime's minimal contract args;
* the zero-delta promise, measured with slime's ``compute_advantages_and_returns`` (docs/how-it-fits.md);
* slime's ``tests/plugin_contracts`` with the plugin's paths: path loading with ``--data-source-path``, runtime
  hooks with ``--custom-reward-post-process-path``.

Two of slime's contract cases cannot take the plugin, by construction: the ``--custom-rm-path`` case runs under
slime's stub ``transformers`` (its tokenizer is a bare ``object()``), so a reward hook that must tokenize cannot
score there; the rollout-log case asserts a side effect of slime's reference function (``args.logged_rollout_id``).
The reward hook is instead called through slime's real ``async_rm`` by the eval-reward case, and both hooks'
signatures are pinned in tests/test_hooks.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slime_xvocab.assets import tokenizer_dir
from slime_xvocab.teacher_server import free_port

ROOT = Path(__file__).resolve().parent.parent
ENV_VAR = "SLIME_XVOCAB_SLIME_CHECKOUTS"
CHECKOUTS = [Path(p) for p in os.environ.get(ENV_VAR, "").split(os.pathsep) if p.strip()]
if CHECKOUTS:
    PARAMS = [pytest.param(p, id=p.name) for p in CHECKOUTS]
else:
    PARAMS = [pytest.param(None, id="no-slime", marks=pytest.mark.skip(reason=f"{ENV_VAR} is not set"))]


def _env(checkout: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XVOCAB_")}
    env["PYTHONPATH"] = os.pathsep.join([str(checkout), str(ROOT), str(ROOT / "tests")])
    env.update(extra)
    return env


def run_check(checkout: Path, name: str) -> dict:
    """Run one check of slime_compat_checks.py against ``checkout``; skip when slime's deps are missing."""
    if not (checkout / "slime" / "__init__.py").exists():
        pytest.fail(f"{ENV_VAR} entry {checkout} is not a slime checkout (no slime/__init__.py)")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "slime_compat_checks.py"), name],
        env=_env(checkout), capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SLIME_COMPAT_RESULT ")]
    assert proc.returncode == 0 and lines, f"check {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(lines[-1].split(" ", 1)[1])
    if "skip" in result:
        pytest.skip(result["skip"])
    return result


def layout(checkout: Path) -> str:
    return "observability" if (checkout / "slime" / "observability").is_dir() else "utils"


@pytest.mark.parametrize("checkout", PARAMS)
def test_hooks_load_through_slimes_path_loader_with_slimes_parameters(checkout):
    got = run_check(checkout, "hook_loading")

    def names(flag: str, kinds: tuple = ("POSITIONAL_OR_KEYWORD",)) -> tuple:
        return tuple(name for name, kind in got[flag]["params"] if kind in kinds)

    assert names("custom_rm_path") == ("args", "sample") and got["custom_rm_path"]["coroutine"]
    assert ("kwargs", "VAR_KEYWORD") in map(tuple, got["custom_rm_path"]["params"])  # async_rm passes **kwargs
    assert names("custom_reward_post_process_path") == ("args", "samples")
    assert len(got["custom_reward_post_process_path"]["params"]) == 2  # slime's contract compares all of them
    assert names("custom_rollout_log_function_path") == (
        "rollout_id", "args", "samples", "rollout_extra_metrics", "rollout_time"
    )
    assert names("rollout_sample_hook_path") == ("args", "sample")
    assert names("rollout_sample_hook_path", ("KEYWORD_ONLY",)) == ("rollout_id", "evaluation")
    assert names("data_source_path") == ("self", "args")


@pytest.mark.parametrize("checkout", PARAMS)
def test_standin_sample_has_slimes_exact_fields(checkout):
    result = run_check(checkout, "sample_fields")
    assert result["standin"] == result["slime"]


@pytest.mark.parametrize("checkout", PARAMS)
def test_metrics_reach_slimes_logger(checkout):
    result = run_check(checkout, "logging")
    assert result["returned"] is False, "slime's default rollout logging must still run"
    assert result["logger_module"] == f"slime.{layout(checkout)}.logging_utils"
    (payload,) = result["recorded"]
    assert payload["rollout/step"] == 3 * 4 * 8 // 16  # slime's compute_rollout_step (train-step mode)
    assert payload["rollout/xvocab/samples"] == 1.0
    assert payload["rollout/xvocab/one_to_one_fraction"] == 0.5


@pytest.mark.parametrize("checkout", PARAMS)
def test_eval_sample_scores_like_stock_async_rm(checkout):
    result = run_check(checkout, "eval_reward")
    for rm_type, got in result.items():
        assert got["metadata_rm_type"] == rm_type  # slime's eval_config put it there
        assert got["stock"] == 1
        assert got["plugin"] == got["stock"], rm_type


@pytest.mark.parametrize("checkout", PARAMS)
def test_data_source_on_slimes_minimal_args(checkout):
    result = run_check(checkout, "data_source")
    assert result["base"][-1] == "RolloutDataSourceWithBuffer"
    assert result["groups"] == 1 and result["group_size"] == 2


@pytest.mark.parametrize("checkout", PARAMS)
def test_zero_delta_in_slimes_own_advantages(checkout):
    """What ``keep`` / ``mask`` mean in slime's real advantage code (numbers in docs/how-it-fits.md)."""
    result = run_check(checkout, "advantages")
    s = result["settings"]

    def adv(rollout: bool, policy: str, normalize: bool) -> dict:
        return s[f"use_rollout_logprobs={rollout},unscored={policy},normalize_advantages={normalize}"]

    # --use-rollout-logprobs + keep: exactly zero advantage at unscored positions (the promise holds).
    assert adv(True, "keep", False)["max_abs_advantage_unscored"] == 0.0
    # Default (Megatron's recomputed log-probs) + keep: the advantage there is the train/inference mismatch.
    assert adv(False, "keep", False)["max_abs_advantage_unscored"] == pytest.approx(
        result["max_abs_mismatch_unscored"], rel=1e-5
    )
    # mask takes unscored positions out of the loss under every setting.
    for rollout in (True, False):
        for normalize in (True, False):
            assert adv(rollout, "mask", normalize)["unscored_tokens_in_loss"] == 0
    # --normalize-advantages shifts a zero delta (whitening) even with --use-rollout-logprobs.
    assert adv(True, "keep", True)["max_abs_advantage_unscored"] > 0.0


# ---------------------------------------------------------------------------------------------- slime's own contracts

def run_contract(checkout: Path, file: str, *args: str) -> subprocess.CompletedProcess:
    """One of slime's contract files, from the checkout's root (its call-site checks read relative paths).

    slime's contract args carry no ``xvocab_*`` keys, so the plugin is configured through ``XVOCAB_*``
    environment variables: real (same) tokenizers (the cached file has no chat template, hence the completion
    format; one shared tokenizer sends ``sample.tokens`` as they are anyway), a teacher URL nobody listens on,
    no retries, and a failed fraction that never stops (the contract samples cannot be scored).
    """
    qwen = str(tokenizer_dir("qwen3"))
    env = _env(
        checkout, XVOCAB_TEACHER_TOKENIZER=qwen, XVOCAB_STUDENT_TOKENIZER=qwen,
        XVOCAB_TEACHER_URLS=f"http://127.0.0.1:{free_port()}", XVOCAB_MAX_RETRIES="0",
        XVOCAB_MAX_FAILED_FRACTION="1.0", XVOCAB_PROMPT_FORMAT="completion",
    )
    return subprocess.run(
        [sys.executable, f"tests/plugin_contracts/{file}", *args, "-q", "-p", "no:cacheprovider"],
        env=env, capture_output=True, text=True, timeout=600, cwd=checkout,
    )


def _contracts_or_skip(checkout: Path, file: str) -> None:
    if not (checkout / "tests" / "plugin_contracts" / file).exists():
        pytest.skip(f"this slime has no tests/plugin_contracts/{file}")
    stock = run_contract(checkout, file)
    if stock.returncode != 0:
        pytest.skip(f"slime's own {file} does not pass here without the plugin:\n{stock.stdout[-1500:]}")


@pytest.mark.parametrize("checkout", PARAMS)
def test_slimes_path_loading_contracts_pass_with_the_data_source(checkout):
    file = "test_plugin_path_loading_contracts.py"
    _contracts_or_skip(checkout, file)
    proc = run_contract(checkout, file, "--data-source-path", "slime_xvocab.data_source.MessagesDataSource")
    assert proc.returncode == 0, proc.stdout[-3000:]


@pytest.mark.parametrize("checkout", PARAMS)
def test_slimes_runtime_hook_contract_passes_with_the_reward_post_process(checkout):
    file = "test_plugin_runtime_hook_contracts.py"
    _contracts_or_skip(checkout, file)
    proc = run_contract(
        checkout, file, "--custom-reward-post-process-path", "slime_xvocab.hooks.post_process_rewards",
        "-k", "custom_reward_post_process",
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
