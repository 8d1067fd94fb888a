"""`slime-xvocab demo --tiny` end to end, as a real subprocess, checked through its metrics.json.

The tiny scenario trains a tiny Llama-3.1-tokenizer teacher and a Qwen3-tokenizer student (cached under the
asset cache after the first run), starts the reference teacher server on loopback and runs on-policy
distillation in the four modes (chunk, prefix, exact, naive) through the plugin's hooks.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slime_xvocab.demo.fallback import align
from slime_xvocab.demo.vocab import CompactVocab

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("demo")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "slime_xvocab.cli", "demo", "--tiny", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "curves.png").stat().st_size > 10_000
    return json.loads((out / "metrics.json").read_text())


def test_every_mode_ran_with_finite_metrics(tiny_run):
    expected = {"chunk", "prefix", "exact", "naive"} if tiny_run["plugin_hooks"] else {"chunk", "exact", "naive"}
    assert set(tiny_run["modes"]) == expected
    for mode, r in tiny_run["modes"].items():
        assert len(r["history"]) >= 2, mode
        for h in r["history"]:
            for key in ("accuracy", "teacher_lp_per_token", "teacher_lp_per_byte", "reverse_kl_per_token",
                        "eot_share", "answer_len_tokens"):
                assert math.isfinite(h[key]), (mode, key, h)
        train = [h for h in r["history"] if "loss" in h]
        assert train and all(math.isfinite(h["loss"]) and math.isfinite(h["kl_to_start"]) for h in train)


def test_teacher_log_probs_shapes_and_hooks(tiny_run):
    for mode, r in tiny_run["modes"].items():
        assert r["check"]["teacher_log_probs_len_ok"], mode
        assert r["check"]["teacher_log_probs_finite"], mode
    assert tiny_run["modes"]["naive"]["hooks"][0] == "slime_xvocab.demo.naive.reward_func"
    if tiny_run["plugin_hooks"]:
        assert tiny_run["modes"]["chunk"]["hooks"][0] == "slime_xvocab.hooks.reward_func"
        assert tiny_run["modes"]["prefix"]["hooks"][0] == "slime_xvocab.hooks.reward_func"
        assert tiny_run["config"]["student_family"] == "qwen3"  # the direction: Qwen3 student


def test_chunk_mode_covers_every_response_token(tiny_run):
    for mode in ("chunk", "prefix"):
        if mode in tiny_run["modes"]:
            assert tiny_run["modes"][mode]["check"]["min_coverage"] == pytest.approx(1.0), mode
    # exact mode cannot score the numbers the two tokenizers split differently: those keep the student's
    # own log-prob (no signal); chunk mode gives (almost) every token a teacher value
    assert tiny_run["modes"]["exact"]["check"]["no_signal_fraction"] > 0.2
    assert tiny_run["modes"]["chunk"]["check"]["no_signal_fraction"] < 0.05


def test_naive_teacher_log_probs_are_clearly_worse_on_the_same_text(tiny_run):
    # every evaluation scores the same student samples twice: through the teacher's own view, and naively
    for mode, r in tiny_run["modes"].items():
        for h in r["history"]:
            assert h["naive_teacher_lp_per_token"] < h["teacher_lp_per_token"] - 1.0, (mode, h)


def test_compact_vocab_round_trip():
    v = CompactVocab([151644, 15, 16])
    assert v.to_model([16, 999]).tolist() == [2, 3]
    assert v.to_real([0, 3]).tolist() == [151644, -1]


def test_align_cuts_where_both_tokenizations_end():
    # "132" as Qwen3 digits (1,1,1 bytes) vs one Llama-3 token (3 bytes); then "8" on both sides
    chunks = align([1, 1, 1, 1], [3, 1])
    assert [(list(s), list(t)) for s, t in chunks] == [([0, 1, 2], [0]), ([3], [1])]
