"""``slime-xvocab check`` on real tokenizers and a small dataset written here.

Every number in the JSON report is recomputed independently where possible: student token counts from
``tokenizer.encode``, a family pair's alignment counts from :func:`align_response` directly, context
overflow from :class:`TeacherViewBuilder`. Exit codes 0/1/2 and the error messages for unreadable input are
checked in process and once as a real ``python -m slime_xvocab.cli check`` subprocess. The live probe runs
against the reference teacher server serving a tiny random GPT-2 with the real GPT-2 vocabulary.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from slime_xvocab.alignment import align_response
from slime_xvocab.assets import load_tokenizer, tokenizer_dir
from slime_xvocab.check import cli_main, get_path
from slime_xvocab.teacher_view import TeacherViewBuilder
from slime_xvocab.token_bytes import token_bytes

ROOT = Path(__file__).resolve().parent.parent

ROWS = [
    {
        "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris (about 2.1 million people)."},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "You are a concise math tutor."},
            {"role": "user", "content": "What is 347 + 85?"},
            {"role": "assistant", "content": "347 + 85 = 432: 7 + 5 = 12, carry 1; 4 + 8 + 1 = 13."},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Reverse a string in Python."},
            {"role": "assistant", "content": "```python\ndef rev(s: str) -> str:\n    return s[::-1]\n```"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "用一句话介绍东京。"},
            {"role": "assistant", "content": "东京是日本的首都，也是世界上最大的都市圈之一。"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Emoji for a party?"},
            {"role": "assistant", "content": "🎉🎂🎈 Party! 👨‍👩‍👧 sang 🎶 until midnight 🌙."},
        ]
    },
    {
        "messages": [
            {"role": "system", "content": "Answer in JSON."},
            {"role": "user", "content": "Boiling point of water?"},
            {"role": "assistant", "content": '{"boiling_point_c": 100}'},
            {"role": "user", "content": "In Fahrenheit?"},
            {"role": "assistant", "content": '{"boiling_point_f": 212}'},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "A table of planets and moons, tab-separated."},
            {"role": "assistant", "content": "planet\tmoons\nEarth\t1\nMars\t2"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Name a naïve café dish."},
            {"role": "assistant", "content": "Crème brûlée — naïve but délicieux. 日本語もOK。"},
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "Spell café with a combining accent."},
            {"role": "assistant", "content": "cafe\u0301 is e + U+0301; NFC writes it as one character."},
        ]
    },
]
TAB_ROWS = {7}  # 1-based rows whose response holds a tab
NFD_ROWS = {9}  # ... and a combining accent, which Qwen3's normaliser composes (NFC)


def responses(rows=ROWS) -> list[str]:
    return [r["messages"][-1]["content"] for r in rows]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("check") / "rows.jsonl", ROWS)


def run_json(capsys, *argv) -> tuple[int, dict]:
    """Run the check in process with --json; stdout must hold exactly one JSON object."""
    code = cli_main([*map(str, argv), "--json"])
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.endswith("\n"), out[:500]
    return code, json.loads(out)


def student_counts(tok, texts) -> list[int]:
    return [len(tok.encode(t, add_special_tokens=False)) + 1 for t in texts]  # + end of turn


# --------------------------------------------------------------------------------------------------
# JSON numbers


def test_same_tokenizer_is_all_one_to_one(capsys, data):
    code, r = run_json(capsys, "--student", "qwen3", "--teacher", "qwen3", "--data", data)
    tok = load_tokenizer("qwen3")
    n_tokens = sum(student_counts(tok, responses()))
    assert code == 0
    assert r["samples"] == len(ROWS)
    assert r["student_tokens"] == r["teacher_tokens"] == n_tokens
    assert r["one_to_one_fraction"] == r["covered_fraction"] == r["eot_mapped_fraction"] == 1.0
    assert r["mean_chunk_width"] == 1.0 and r["max_chunk_width"] == 1
    assert r["byte_mismatch_samples"] == 0 and r["same_tokenizer"] is True
    assert any("share a tokenizer" in w for w in r["warnings"])
    assert r["tokenizers"]["student"]["vocab_size"] == len(tok)
    assert r["end_of_turn"] == {"student": "<|im_end|>", "teacher": "<|im_end|>", "unscored_by_choice": False}


def test_end_of_turn_unscored_without_a_warning(capsys, data):
    # A base teacher that never learned the turn end: --end-of-turn unscored leaves the student's end unscored.
    code, r = run_json(capsys, "--student", "qwen3", "--teacher", "llama3_1", "--data", data)
    assert code == 0 and r["eot_mapped_fraction"] == 1.0
    code, r_none = run_json(capsys, "--student", "qwen3", "--teacher", "llama3_1", "--data", data,
                            "--end-of-turn", "unscored")
    assert code == 0 and r_none["eot_mapped_fraction"] == 0.0
    assert r_none["end_of_turn"]["teacher"] is None and r_none["end_of_turn"]["unscored_by_choice"] is True
    assert not any("not paired" in w for w in r_none["warnings"])
    # one fewer teacher token per sample (no end-of-turn id), and those student positions lose their signal
    assert r_none["teacher_tokens"] == r["teacher_tokens"] - r["samples"]
    assert r_none["covered_fraction"] < r["covered_fraction"]


def test_family_pair_matches_align_response(capsys, data):
    code, r = run_json(capsys, "--student", "qwen3", "--teacher", "llama3_1", "--data", data)
    s_tok, t_tok = load_tokenizer("qwen3"), load_tokenizer("llama3_1")
    s_tab, t_tab = token_bytes(s_tok), token_bytes(t_tok)
    one = cov = t_n = chunks = width_sum = 0
    widths_max = 0
    for text in responses():
        enc, al = align_response(s_tok.encode(text, add_special_tokens=False), s_tab, t_tok, t_tab)
        st = al.stats()
        one, cov, t_n = one + st.one_to_one_tokens, cov + st.covered_tokens, t_n + len(enc.ids)
        s_sizes, t_sizes = al.chunk_sizes()
        chunks += st.chunks
        width_sum += int(np.maximum(s_sizes, t_sizes).sum())
        widths_max = max(widths_max, st.max_chunk_width)
    n = len(ROWS)  # every sample adds one 1:1 chunk: <|im_end|> -> <|eot_id|>
    s_n = sum(student_counts(s_tok, responses()))
    assert code == 0
    assert r["student_tokens"] == s_n
    assert r["teacher_tokens"] == t_n + n
    assert r["one_to_one_fraction"] == pytest.approx((one + n) / s_n)
    assert r["covered_fraction"] == pytest.approx((cov + n) / s_n) == pytest.approx(1.0)
    assert r["mean_chunk_width"] == pytest.approx((width_sum + n) / (chunks + n))
    assert r["max_chunk_width"] == widths_max > 1
    assert r["teacher_student_token_ratio"] == pytest.approx((t_n + n) / s_n)
    assert r["eot_mapped_fraction"] == 1.0 and r["byte_mismatch_samples"] == 0
    assert r["end_of_turn"] == {"student": "<|im_end|>", "teacher": "<|eot_id|>", "unscored_by_choice": False}
    assert "▶" in r["preview"]["teacher"] and "⟦<|start_header_id|>⟧" in r["preview"]["teacher"]
    assert r["preview"]["student"].endswith("⟦<|im_end|>⟧")
    assert r["warnings"] == []


@pytest.mark.parametrize("student,teacher", [("llama3_1", "qwen3"), ("gemma3", "deepseek_v3")])
def test_more_family_pairs_align_fully(capsys, data, student, teacher):
    code, r = run_json(capsys, "--student", student, "--teacher", teacher, "--data", data)
    assert code == 0
    assert r["student_tokens"] == sum(student_counts(load_tokenizer(student), responses()))
    assert r["covered_fraction"] == 1.0 and r["byte_mismatch_samples"] == 0
    assert r["eot_mapped_fraction"] == 1.0
    assert 0 < r["one_to_one_fraction"] < 1
    # Qwen3's normaliser composes the accent: aligned through the offsets, counted, not a mismatch.
    assert r["normalized_samples"] == (len(NFD_ROWS) if teacher == "qwen3" else 0)


def test_context_limit_counts_overflow_not_mismatch(capsys, data):
    limit = 40
    code, r = run_json(
        capsys, "--student", "qwen3", "--teacher", "llama3_1", "--data", data, "--max-teacher-tokens", limit
    )
    builder = TeacherViewBuilder(load_tokenizer("qwen3"), load_tokenizer("llama3_1"))
    s_tok = load_tokenizer("qwen3")
    lengths = []
    for row in ROWS:
        ids = s_tok.encode(row["messages"][-1]["content"], add_special_tokens=False) + [s_tok.eos_token_id]
        lengths.append(len(builder.build(row["messages"][:-1], ids).input_ids))
    over = sum(n > limit for n in lengths)
    assert 0 < over < len(ROWS)
    assert code == 0 and r["byte_mismatch_samples"] == 0
    assert r["context_overflow_samples"] == over
    assert r["max_teacher_tokens"] == limit and r["covered_fraction"] < 1
    assert r["eot_mapped_fraction"] == pytest.approx(1 - over / len(ROWS))
    assert r["unaligned_tokens_by_reason"]["teacher_context"] > 0
    assert r["teacher_sequence_tokens_max"] == max(lengths)
    assert any("context limit" in w for w in r["warnings"])
    assert not any("end-of-turn" in w for w in r["warnings"])  # dropped by truncation, not unmapped

    # Every prompt alone overflows: nothing aligns, but the bytes are fine and the preview still renders.
    code, r = run_json(capsys, "--student", "qwen3", "--teacher", "llama3_1", "--data", data, "--max-teacher-tokens", 5)
    assert code == 0 and r["context_overflow_samples"] == len(ROWS) and r["covered_fraction"] == 0.0
    assert r["unaligned_tokens_by_reason"] == {"teacher_context": r["student_tokens"]}
    assert "▶" in r["preview"]["teacher"]


@pytest.fixture(scope="module")
def lossy_teacher(tmp_path_factory) -> Path:
    """Llama-3.1's real tokenizer with a normaliser that deletes tabs: it cannot reproduce those bytes."""
    path = tmp_path_factory.mktemp("lossy_llama")
    src = tokenizer_dir("llama3_1")
    for f in src.iterdir():
        shutil.copy(f, path)
    tj = json.loads((path / "tokenizer.json").read_text())
    tj["normalizer"] = {"type": "Replace", "pattern": {"String": "\t"}, "content": ""}
    (path / "tokenizer.json").write_text(json.dumps(tj))
    return path


def test_byte_mismatch_exits_1_unless_allowed(capsys, data, lossy_teacher):
    args = ("--student", "qwen3", "--teacher", lossy_teacher, "--data", data)
    code, r = run_json(capsys, *args)
    assert code == 1 and r["exit_code"] == 1
    assert r["byte_mismatch_samples"] == len(TAB_ROWS)
    (example,) = r["byte_mismatch_examples"]
    assert example["row"] in TAB_ROWS and "text_changed" in example["reasons"]
    assert "differ at byte" in example["detail"]
    assert any("cannot reproduce" in w for w in r["warnings"])

    code, r2 = run_json(capsys, *args, "--allow-mismatch")
    assert code == 0 and r2["byte_mismatch_samples"] == len(TAB_ROWS)


def test_nested_messages_key_response_key_and_parquet(capsys, tmp_path):
    pd = pytest.importorskip("pandas")
    nested = [{"id": i, "metadata": {"messages": r["messages"]}} for i, r in enumerate(ROWS)]
    split = [{"prompt": r["messages"][:-1], "answer": r["messages"][-1]["content"]} for r in ROWS]
    jsonl = write_jsonl(tmp_path / "nested.jsonl", nested)
    parquet = tmp_path / "nested.parquet"
    pd.DataFrame([{"id": i, "metadata": json.dumps(x["metadata"])} for i, x in enumerate(nested)]).to_parquet(parquet)
    split_file = write_jsonl(tmp_path / "split.jsonl", split)
    base = ("--student", "qwen3", "--teacher", "llama3_1")
    _, ref = run_json(capsys, *base, "--data", write_jsonl(tmp_path / "plain.jsonl", ROWS))
    for extra in (
        ("--data", jsonl, "--messages-key", "metadata.messages"),
        ("--data", parquet, "--messages-key", "metadata.messages"),
        ("--data", split_file, "--messages-key", "prompt", "--response-key", "answer"),
    ):
        code, r = run_json(capsys, *base, *extra)
        assert code == 0
        for key in ("samples", "student_tokens", "teacher_tokens", "one_to_one_fraction", "covered_fraction"):
            assert r[key] == ref[key], (extra, key)
    assert get_path({"a": {"b": 1}, "a.c": 2}, "a.b") == 1 and get_path({"a.c": 2}, "a.c") == 2


def test_warnings_and_exact_mode(capsys, data, tmp_path):
    rows = [
        *ROWS,
        {
            "messages": [
                {"role": "user", "content": "call a tool"},
                {"role": "assistant", "content": "", "tool_calls": []},
            ]
        },
    ]
    code, r = run_json(
        capsys,
        "--student",
        "gpt2",
        "--teacher",
        "llama3_1",
        "--data",
        write_jsonl(tmp_path / "t.jsonl", rows),
        "--mode",
        "exact",
        "--rollout-temperature",
        "0.7",
    )
    assert code == 0 and r["skipped_rows"] == 1 and r["samples"] == len(ROWS)
    assert r["signal_fraction"] == r["one_to_one_fraction"] < 0.9
    text = "\n".join(r["warnings"])
    for needle in ("--rollout-temperature 0.7", "exact mode", "no chat template", "skipped"):
        assert needle in text


def test_human_output(capsys, data):
    code = cli_main(["--student", "qwen3", "--teacher", "llama3_1", "--data", str(data), "--n", "3"])
    out = capsys.readouterr().out
    assert code == 0
    for needle in (
        "Tokenizers",
        "Qwen2Tokenizer",
        "First conversation",
        "▶",
        "⟦<|eot_id|>⟧",
        "End of turn: student '<|im_end|>' → teacher '<|eot_id|>'",
        "1:1 fraction",
        "OK",
    ):
        assert needle in out, needle


# --------------------------------------------------------------------------------------------------
# Bad input: exit 2 with a clear message


def bad_input_cases(tmp: Path) -> list[tuple[list[str], str]]:
    good = write_jsonl(tmp / "good.jsonl", ROWS[:2])
    not_json = tmp / "not_json.jsonl"
    not_json.write_text(json.dumps(ROWS[0]) + "\n{oops\n")
    latin1 = tmp / "latin1.jsonl"
    latin1.write_bytes(json.dumps(ROWS[0]).encode() + b"\n" + '{"messages": "caf\xe9"}'.encode("latin-1") + b"\n")
    missing = write_jsonl(tmp / "missing.jsonl", [ROWS[0], {"conversation": []}])
    no_asst = write_jsonl(tmp / "no_asst.jsonl", [ROWS[0], {"messages": [{"role": "user", "content": "hi"}]}])
    base = ["--student", "qwen3", "--teacher", "qwen3", "--data"]
    return [
        ([*base, str(tmp / "nope.jsonl")], "not found"),
        ([*base, str(not_json)], "line 2 is not JSON"),
        ([*base, str(latin1)], "line 2 is not valid UTF-8"),
        ([*base, str(missing)], "row 2 (line 2): missing key 'messages'"),
        ([*base, str(no_asst)], "row 2 (line 2): no assistant turn"),
        ([*base, str(good), "--template-kwargs", "{bad"], "--template-kwargs is not JSON"),
        (["--student", "no_such_family", "--teacher", "qwen3", "--data", str(good)], "neither a directory"),
        ([*base, str(good), "--n", "0"], "--n must be >= 1"),
    ]


def test_bad_input_exits_2(capsys, tmp_path):
    for argv, message in bad_input_cases(tmp_path):
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (message, err)
        assert cli_main([*argv, "--json"]) == 2
        captured = capsys.readouterr()
        assert message in json.loads(captured.out)["error"]
    assert cli_main(["--student", "qwen3"]) == 2  # argparse: required options missing
    assert "required" in capsys.readouterr().err
    assert cli_main(["--help"]) == 0 and "deepseek_v3" in capsys.readouterr().out  # families are listed


def test_cli_subprocess(tmp_path, data):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "slime_xvocab.cli", "check", "--student", "qwen3", "--teacher", "llama3_1"]
    ok = subprocess.run([*cmd, "--data", str(data), "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    (line,) = ok.stdout.splitlines()  # exactly one JSON object, nothing else on stdout
    assert json.loads(line)["samples"] == len(ROWS)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(json.dumps(ROWS[0]).encode() + b"\n\xff\xfe\n")
    res = subprocess.run([*cmd, "--data", str(bad)], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and "line 2 is not valid UTF-8" in res.stderr and res.stdout == ""


# --------------------------------------------------------------------------------------------------
# Live teacher probe against the reference server


GPT2_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '<|endoftext|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)


@pytest.fixture(scope="module")
def teacher_server(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from slime_xvocab.teacher_server import start_teacher_server

    path = tmp_path_factory.mktemp("tiny_gpt2")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50257, n_embd=16, n_layer=1, n_head=2, n_positions=256)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir("gpt2")))  # a fresh copy: load_tokenizer is cached
    tok.chat_template = GPT2_CHAT_TEMPLATE
    tok.save_pretrained(path)
    with start_teacher_server(path) as handle:
        yield path, handle


@pytest.mark.slow
def test_live_probe(capsys, data, teacher_server):
    path, handle = teacher_server
    code, r = run_json(
        capsys,
        "--student",
        "qwen3",
        "--teacher",
        path,
        "--data",
        data,
        "--teacher-url",
        handle.url,
        "--probe-samples",
        3,
    )
    t = r["teacher"]
    assert code == 0, t
    assert t["healthy"] is True and t["errors"] == 0 and t["bad_responses"] == 0
    assert t["scored_samples"] == 3
    assert t["determinism_max_abs_diff"] == 0.0
    assert 0 < t["latency_p50_s"] <= t["latency_p99_s"]
    assert t["mean_teacher_logprob"] < 0
    assert t["model_info"]["model_path"] == str(path)
    assert r["max_teacher_tokens"] == t["server_info"]["max_req_input_len"] == 256
    assert r["max_teacher_tokens_source"].startswith("teacher")
    assert r["end_of_turn"]["teacher"] == "<|endoftext|>" and r["covered_fraction"] == 1.0

    code = cli_main(
        [
            "--student",
            "qwen3",
            "--teacher",
            str(path),
            "--data",
            str(data),
            "--n",
            "2",
            "--teacher-url",
            handle.url,
            "--probe-samples",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "Teacher probe" in out and "determinism" in out


def test_probe_of_a_dead_teacher_fails(capsys, data):
    from slime_xvocab.teacher_server import free_port

    url = f"http://127.0.0.1:{free_port()}"
    code, r = run_json(
        capsys,
        "--student",
        "qwen3",
        "--teacher",
        "llama3_1",
        "--data",
        data,
        "--n",
        2,
        "--teacher-url",
        url,
        "--probe-samples",
        1,
        "--teacher-timeout",
        5,
    )
    assert code == 1 and r["byte_mismatch_samples"] == 0
    assert r["teacher"]["healthy"] is False and r["teacher"]["errors"] >= 3
    assert r["teacher"]["determinism_max_abs_diff"] is None
    assert any("teacher probe" in w for w in r["warnings"])


# --------------------------------------------------------------------------------------------------
# Hardening: real causes first, one API-key variable, no credentials in the output


def test_byte_mismatch_headlines_the_real_cause(capsys, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Draw a bar"}, {"role": "assistant", "content": "a\u2581b"}]}]
    path = write_jsonl(tmp_path / "u2581.jsonl", rows)
    code, r = run_json(capsys, "--student", "qwen3", "--teacher", "gemma3", "--data", path)
    assert code == 1 and r["byte_mismatch_samples"] == 1
    assert "U+2581" in r["byte_mismatch_examples"][0]["cause"]
    (headline,) = [w for w in r["warnings"] if "cannot reproduce" in w]
    assert "spells a literal U+2581" in headline and "NFC" not in headline


def test_api_key_variable_is_the_hooks_one_and_the_old_name_warns(capsys):
    from slime_xvocab.check import env_api_key

    assert env_api_key({"XVOCAB_API_KEY": "sk-new", "SLIME_XVOCAB_TEACHER_API_KEY": "sk-old"}) == "sk-new"
    assert env_api_key({"SLIME_XVOCAB_TEACHER_API_KEY": "sk-old"}) == "sk-old"
    assert "SLIME_XVOCAB_TEACHER_API_KEY is deprecated: set XVOCAB_API_KEY" in capsys.readouterr().err
    assert env_api_key({}) is None


def test_check_output_never_shows_url_credentials(capsys, data):
    from slime_xvocab.teacher_server import free_port

    url = f"http://bob:hunter22@127.0.0.1:{free_port()}"
    argv = ["--student", "qwen3", "--teacher", "qwen3", "--data", data, "--n", 1, "--teacher-url", url]
    code, r = run_json(capsys, *argv, "--probe-samples", 1, "--teacher-timeout", 2)
    assert code == 1 and "hunter22" not in json.dumps(r) and r["teacher"]["url"].startswith("http://***@")
    assert cli_main([*map(str, argv), "--probe-samples", "1", "--teacher-timeout", "2"]) == 1
    captured = capsys.readouterr()
    assert "hunter22" not in captured.out + captured.err


def test_tokenizer_specs_like_the_hooks(capsys, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", ROWS[:1])
    assert cli_main(["--student", str(tokenizer_dir("qwen3")), "--teacher", "qwen3", "--data", str(good)]) == 0
    capsys.readouterr()
    assert cli_main(["--student", "/no/such/dir", "--teacher", "qwen3", "--data", str(good)]) == 2
    assert "hub id" in capsys.readouterr().err


def test_several_teachers_print_each_pair(capsys, data):
    code, r = run_json(capsys, "--student", "qwen3", "--teacher", "llama3_1", "--teacher", "gemma3", "--data", data,
                       "--n", "3")
    assert code == 0 and list(r["teachers"]) == ["llama3_1", "gemma3"] and r["exit_code"] == 0
    for report in r["teachers"].values():
        assert report["samples"] == 3 and report["covered_fraction"] > 0.9
    assert r["teachers"]["gemma3"]["end_of_turn"]["teacher"] == "<end_of_turn>"
    code = cli_main(["--student", "qwen3", "--teacher", "llama3_1", "--teacher", "gemma3", "--data", str(data),
                     "--n", "2"])
    out = capsys.readouterr().out
    assert code == 0 and "teacher llama3_1" in out and "teacher gemma3" in out
    assert cli_main(["--student", "qwen3", "--teacher", "llama3_1", "--teacher", "gemma3", "--data", str(data),
                     "--teacher-url", "http://127.0.0.1:1"]) == 2  # one URL per teacher
    assert "one URL per teacher" in capsys.readouterr().err
