"""MessagesDataSource and its pure helpers: messages are kept, the student prompt is slime's.

The oracle is slime's rule, re-implemented here independently: with --apply-chat-template a string prompt
becomes one user message, the prompt is ``apply_chat_template(messages, tools=..., tokenize=False,
add_generation_prompt=True, **kwargs)``, and prompts longer than --rollout-max-prompt-len tokens (encoded
without special tokens) are dropped. If slime itself is importable, the class is also compared with
slime's own data source on the same file.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from argparse import Namespace
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from slime_xvocab import data_source
from slime_xvocab.assets import load_tokenizer, tokenizer_dir
from slime_xvocab.data_source import (
    add_messages_to_row,
    keep_messages,
    main,
    prompt_messages,
    render_student_prompt,
)
from slime_xvocab.errors import ConfigError, SampleError
from slime_xvocab.teacher_view import messages_from_metadata

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi! 你好 🤖"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "def f(x):\n    return x  # ?"},
]
ROWS = [
    {"input": "What is 2+2?", "label": "4", "metadata": {"source": "arith"}},
    {"input": MULTI_TURN, "label": "x", "metadata": {"source": "chat"}, "tools": TOOLS},
    {"input": "naïve café " * 200, "label": "long"},  # dropped by a 100-token prompt limit
    {"input": [{"role": "user", "content": "Weather in Paris?"}], "label": "sun", "tools": json.dumps(TOOLS)},
]


@dataclass
class FakeSample:
    """Stand-in for slime's Sample: only the fields the helpers touch."""

    prompt: object
    metadata: dict = field(default_factory=dict)
    index: int | None = None


def slime_rule(tokenizer, row, kwargs, max_len=None):
    """Independent oracle: the student prompt slime renders with --apply-chat-template (None if dropped)."""
    prompt = row["input"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    tools = row.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    text = tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True, **kwargs
    )
    if max_len is not None and len(tokenizer(text, add_special_tokens=False)["input_ids"]) > max_len:
        return None
    return text


@pytest.fixture(scope="module")
def qwen():
    return load_tokenizer("qwen3")


@pytest.fixture(scope="module")
def llama():
    return load_tokenizer("llama3_1")


def test_prompt_messages():
    assert prompt_messages("hi") == [{"role": "user", "content": "hi"}]
    assert prompt_messages(MULTI_TURN) == MULTI_TURN
    with pytest.raises(SampleError, match=r"sample 4: prompt\[0\] has no string 'role'"):
        prompt_messages([{"content": "x"}], sample_id=4)
    with pytest.raises(SampleError, match="must be a list"):
        prompt_messages(17)


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}])
def test_render_matches_slime_rule(qwen, llama, kwargs):
    for tok in (qwen, llama):
        kw = kwargs if tok is qwen else {}
        for row in ROWS:
            messages = prompt_messages(row["input"])
            tools = row.get("tools")
            tools = json.loads(tools) if isinstance(tools, str) else tools
            assert render_student_prompt(tok, messages, tools, kw) == slime_rule(tok, row, kw)


def test_keep_messages(qwen):
    samples = [FakeSample(r["input"], {**r.get("metadata", {}), **({"tools": TOOLS} if "tools" in r else {})})
               for r in ROWS]
    original_meta = samples[0].metadata
    kwargs = {"enable_thinking": False}
    out = keep_messages(samples, key="messages", tokenizer=qwen, chat_template_kwargs=kwargs)
    assert out is not samples and out == samples
    for row, sample in zip(ROWS, out, strict=True):
        expected = prompt_messages(row["input"])
        assert messages_from_metadata(sample.metadata, "messages") == expected
        assert sample.prompt == slime_rule(qwen, {**row, "tools": sample.metadata.get("tools")},
                                           {"enable_thinking": False})
    assert out[0].metadata["source"] == "arith" and "messages" not in original_meta
    assert out[1].metadata["messages"] is not ROWS[1]["input"]  # a copy: later prompt edits don't leak


def test_keep_messages_without_template_and_dotted_key():
    samples = [FakeSample("raw text"), FakeSample(copy.deepcopy(MULTI_TURN), {"a": {"b": 1}})]
    out = keep_messages(samples, key="a.msgs")
    assert out[0].prompt == "raw text"  # no --apply-chat-template: the prompt stays as slime leaves it
    assert out[0].metadata == {"a": {"msgs": [{"role": "user", "content": "raw text"}]}}
    assert out[1].metadata["a"] == {"b": 1, "msgs": MULTI_TURN}
    assert messages_from_metadata(out[1].metadata, "a.msgs") == MULTI_TURN
    with pytest.raises(SampleError, match="sample 7"):
        keep_messages([FakeSample([{"role": "user"}], index=7)])


def test_rows_cli_jsonl_and_parquet(tmp_path, qwen):
    src = tmp_path / "eval.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    assert main(["--in", str(src), "--out", str(tmp_path / "out.jsonl")]) == 0
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    for row, new in zip(ROWS, out, strict=True):
        assert new["input"] == row["input"] and new["label"] == row["label"]  # prompt column untouched
        assert new["metadata"]["messages"] == prompt_messages(row["input"])
    assert out[0]["metadata"]["source"] == "arith"

    rows = [{"prompt": MULTI_TURN[1:2], "metadata": {"k": 1}}, {"prompt": MULTI_TURN, "metadata": {"k": 2}}]
    pq_in, pq_out = tmp_path / "in.parquet", tmp_path / "out.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), pq_in)
    argv = ["--in", str(pq_in), "--out", str(pq_out), "--input-key", "prompt", "--messages-key", "opd.m"]
    assert main(argv) == 0
    back = pq.read_table(pq_out).to_pylist()
    assert messages_from_metadata(back[1]["metadata"], "opd.m") == MULTI_TURN
    assert back[0]["metadata"]["k"] == 1

    with pytest.raises(SampleError, match="row 0: no 'question' column"):
        add_messages_to_row({"input": "x"}, input_key="question", row_number=0)


def test_class_imports_without_slime():
    try:
        import slime.rollout.data_source  # noqa: F401
    except ImportError:
        cls = data_source.MessagesDataSource  # importable (module __getattr__), explains on use
        assert cls.__name__ == "MessagesDataSource"
        with pytest.raises(ConfigError, match="needs slime"):
            cls(Namespace())
    with pytest.raises(AttributeError):
        data_source.NoSuchThing  # noqa: B018


def _slime_args(path, **overrides) -> Namespace:
    args = dict(
        rollout_global_dataset=True, prompt_data=str(path), hf_checkpoint=str(tokenizer_dir("qwen3")),
        dump_details=None, rollout_max_prompt_len=100, input_key="input", multimodal_keys=None,
        label_key="label", metadata_key="metadata", tool_key="tools", apply_chat_template=True,
        apply_chat_template_kwargs={"enable_thinking": False}, rollout_seed=3, rollout_shuffle=True,
        buffer_filter_path=None, n_samples_per_prompt=2, save=None, load=None,
    )
    args.update(overrides)
    return Namespace(**args)


def test_against_slime_itself(tmp_path, qwen):
    """Same prompts, order, filtering and groups as slime's own data source, plus the messages."""
    slime_ds = pytest.importorskip("slime.rollout.data_source", reason="slime is not importable here")
    rows = ROWS * 3
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    no_template = {"apply_chat_template": False, "rollout_max_prompt_len": None}
    for overrides in ({}, no_template, {"rollout_shuffle": False}):
        args = _slime_args(path, **overrides)
        ours = data_source.MessagesDataSource(args)
        theirs = slime_ds.RolloutDataSourceWithBuffer(copy.copy(args))
        assert ours.args is args and len(ours) == len(theirs)
        got, want = ours.get_samples(5), theirs.get_samples(5)
        for g_group, w_group in zip(got, want, strict=True):
            for g, w in zip(g_group, w_group, strict=True):
                assert (g.prompt, g.label) == (w.prompt, w.label)
                assert (g.index, g.group_index) == (w.index, w.group_index)
                messages = messages_from_metadata(g.metadata, "messages")
                assert {k: v for k, v in g.metadata.items() if k != "messages"} == w.metadata
                row = next(r for r in rows if prompt_messages(r["input"]) == messages)
                if args.apply_chat_template:
                    kwargs = args.apply_chat_template_kwargs
                    assert g.prompt == slime_rule(qwen, row, kwargs, args.rollout_max_prompt_len)


def test_rows_cli_errors_name_the_file_line_without_a_traceback(tmp_path, capsys):
    good = json.dumps({"input": "hi"})
    cases = {
        "not_json.jsonl": (f"{good}\n\n{{oops\n".encode(), "not_json.jsonl: line 3 is not JSON"),
        "latin1.jsonl": (good.encode() + b"\n" + '{"input": "caf\xe9"}'.encode("latin-1") + b"\n",
                         "latin1.jsonl: line 2 is not valid UTF-8"),
        "no_input.jsonl": (f"{good}\n\n{json.dumps({'question': 'x'})}\n".encode(),
                           "no_input.jsonl, line 3: row 2: no 'input' column"),
        "bad_role.jsonl": (f"{good}\n{json.dumps({'input': [{'content': 'x'}]})}\n".encode(),
                           "bad_role.jsonl, line 2: sample 2: prompt[0] has no string 'role'"),
        "list_row.jsonl": (b"[1, 2]\n", "list_row.jsonl: line 1 is a JSON list, not an object"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        assert main(["--in", str(tmp_path / name), "--out", str(tmp_path / "out.jsonl")]) == 2, name
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (message, err)
    res = subprocess.run(
        [sys.executable, "-m", "slime_xvocab.data_source", "--in", str(tmp_path / "latin1.jsonl"), "--out",
         str(tmp_path / "o.jsonl")],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent,
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr and "line 2 is not valid UTF-8" in res.stderr
