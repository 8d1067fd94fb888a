"""Teacher view: the teacher's own chat template + the student's response bytes + the teacher's EOT.

Real tokenizers and real chat templates of five families; every ordered pair.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from slime_xvocab.alignment import Unaligned
from slime_xvocab.assets import load_tokenizer, tokenizer_dir
from slime_xvocab.errors import ConfigError, SampleError
from slime_xvocab.teacher_view import (
    TeacherViewBuilder,
    messages_from_metadata,
    student_end_ids,
    template_end_of_turn,
    validate_messages,
)
from slime_xvocab.token_bytes import token_bytes

FAST = ("qwen3", "llama3_1", "gemma3", "deepseek_v3")
EOT = {
    "qwen3": "<|im_end|>",
    "llama3_1": "<|eot_id|>",
    "gemma3": "<end_of_turn>",
    "deepseek_v3": "<｜end▁of▁sentence｜>",
    "smollm2": "<|im_end|>",
}

CONVERSATION = [
    {"role": "system", "content": "You are a careful assistant. Réponds en français si on te le demande."},
    {"role": "user", "content": "Write add() in Python.\n```python\ndef add(a, b):\n```"},
    {"role": "assistant", "content": "def add(a, b):\n    return a + b  # 加法"},
    {"role": "user", "content": "Now explain it: 你好，世界 🤖🎉 naïve café"},
]

RESPONSES = {
    "unicode_code": "Sure! 你好，世界。東京タワー 🤖🎉\n```python\ndef add(a, b):\n\treturn a + b"
    "  # code\n```\nnaïve café 3.14159",
    "leading_space": " \n  Hello there,   spaced   out.",
    "leading_newlines": "\n\nOK.",
    "leading_multibyte": "你好🤖 — done.",
    "leading_emoji": "🎉 party",
}


@pytest.fixture(scope="module")
def toks():
    return {name: load_tokenizer(name) for name in FAST}


@pytest.fixture(scope="module")
def builders(toks):
    return {(s, t): TeacherViewBuilder(toks[s], toks[t]) for s in FAST for t in FAST}


def oracle_prompt_ids(teacher, messages, **kwargs) -> list[int]:
    text = teacher.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    return teacher.encode(text, add_special_tokens=False)


def check_view(builder, s_name, t_name, s_tok, t_tok, messages, text, ends):
    """Every property a view must have; shared by the fast matrix and the slow SmolLM2 matrix."""
    s_table, t_table = token_bytes(s_tok), token_bytes(t_tok)
    text_ids = s_tok.encode(text, add_special_tokens=False)
    s_eot = s_tok.convert_tokens_to_ids(EOT[s_name])
    response = text_ids + [s_eot] if ends else text_ids
    view = builder.build(messages, response, sample_id="s1")

    # Prompt: exactly the teacher's own template, tokenized without added specials (no doubled BOS).
    expected_prompt = oracle_prompt_ids(t_tok, messages)
    assert view.input_ids[: view.response_start] == expected_prompt
    assert t_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"] == (
        expected_prompt
    )
    if t_tok.bos_token_id is not None:
        assert view.input_ids[:2] != [t_tok.bos_token_id] * 2
    assert view.prompt_text == t_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    t_resp = view.response_ids
    t_eot = t_tok.convert_tokens_to_ids(EOT[t_name])
    if builder.same_tokenizer:
        assert t_resp == response
        assert view.alignment.student_chunk.tolist() == list(range(len(response)))
        assert view.eot_mapped == ends
        return view
    n_text = len(t_resp) - (1 if ends else 0)
    # Response: the teacher's tokens spell exactly the student's bytes.
    assert t_table.bytes_of(t_resp[:n_text]) == s_table.bytes_of(text_ids) == text.encode()
    assert view.exact_bytes
    assert not any(t_table.special[i] for i in t_resp[:n_text])
    a = view.alignment
    assert a.n_student == len(response) and a.n_teacher == len(t_resp)
    # Every chunk spells the same bytes on both sides.
    for c in range(a.num_chunks):
        s_ids = [response[i] for i in np.flatnonzero(a.student_chunk == c)]
        t_ids = [t_resp[i] for i in np.flatnonzero(a.teacher_chunk == c)]
        assert s_table.bytes_of(s_ids) == t_table.bytes_of(t_ids)
    assert (a.student_chunk[: len(text_ids)] >= 0).all(), a.reason
    # End of turn: the teacher's own EOT, paired with the student's final position, or nothing.
    assert view.eot_mapped == ends
    if ends:
        assert t_resp[-1] == t_eot and view.eot_ids == (t_eot,)
        last = a.student_chunk[-1]
        assert last >= 0 and a.teacher_chunk[-1] == last
        assert np.flatnonzero(a.student_chunk == last).tolist() == [len(response) - 1]
        assert np.flatnonzero(a.teacher_chunk == last).tolist() == [len(t_resp) - 1]
    else:
        assert t_eot not in t_resp
    assert view.teacher_truncated_tokens == 0
    return view


@pytest.mark.parametrize("s_name,t_name", list(itertools.product(FAST, FAST)))
def test_every_pair_multi_turn(toks, builders, s_name, t_name):
    builder = builders[(s_name, t_name)]
    assert builder.same_tokenizer == (s_name == t_name)
    for text, ends in itertools.product(RESPONSES.values(), (True, False)):
        check_view(builder, s_name, t_name, toks[s_name], toks[t_name], CONVERSATION, text, ends)
    # Single-turn, no system prompt.
    check_view(builder, s_name, t_name, toks[s_name], toks[t_name], CONVERSATION[3:], "Fine.", True)


@pytest.mark.slow
def test_smollm2_pairs(toks):
    smol = load_tokenizer("smollm2")
    pairs = [("smollm2", t) for t in FAST + ("smollm2",)] + [(s, "smollm2") for s in FAST]
    for s_name, t_name in pairs:
        s_tok = smol if s_name == "smollm2" else toks[s_name]
        t_tok = smol if t_name == "smollm2" else toks[t_name]
        builder = TeacherViewBuilder(s_tok, t_tok)
        for text, ends in itertools.product(RESPONSES.values(), (True, False)):
            check_view(builder, s_name, t_name, s_tok, t_tok, CONVERSATION, text, ends)
    # SmolLM2's template adds its own default system prompt when the conversation has none.
    view = TeacherViewBuilder(toks["qwen3"], smol, system_prompt="teacher_default").build(CONVERSATION, [])
    assert "You are a helpful AI assistant named SmolLM" in view.prompt_text


def test_end_of_turn_discovery(toks, builders):
    for name in FAST:
        table = token_bytes(toks[name])
        eot = toks[name].convert_tokens_to_ids(EOT[name])
        assert template_end_of_turn(toks[name], table) == [eot]
        assert eot in student_end_ids(toks[name], table)
        assert builders[(name, name)].teacher_eot_ids == (eot,)
    qwen_ends = builders[("qwen3", "llama3_1")].student_end_ids
    assert toks["qwen3"].convert_tokens_to_ids("<|endoftext|>") in qwen_ends
    assert toks["qwen3"].convert_tokens_to_ids("<think>") not in qwen_ends


def test_empty_and_eot_only_responses(toks, builders):
    b = builders[("qwen3", "gemma3")]
    view = b.build(CONVERSATION, [])
    assert view.response_ids == [] and view.alignment.n_student == 0 and not view.eot_mapped
    view = b.build(CONVERSATION, [toks["qwen3"].convert_tokens_to_ids("<|im_end|>")])
    assert view.response_ids == [toks["gemma3"].convert_tokens_to_ids("<end_of_turn>")]
    assert view.eot_mapped and view.alignment.student_chunk.tolist() == [0]


def test_truncated_inside_a_character(toks, builders):
    """A response cut by max_response_len in the middle of an emoji: the cut bytes stay unaligned."""
    qwen, table = toks["qwen3"], token_bytes(toks["qwen3"])
    ids = qwen.encode("Hi 🤖🎉", add_special_tokens=False)
    cut = next(k for k in range(1, len(ids)) if not _valid_utf8(table.bytes_of(ids[:k])))
    view = builders[("qwen3", "llama3_1")].build(CONVERSATION, ids[:cut])
    a = view.alignment
    assert not view.eot_mapped and not view.exact_bytes
    assert a.reason[cut - 1] == Unaligned.INVALID_UTF8
    assert (a.student_chunk[: cut - 2] >= 0).all()  # "Hi" and the space before the emoji are aligned


def _valid_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def test_special_tokens_inside_the_response(toks, builders):
    qwen, llama = toks["qwen3"], toks["llama3_1"]
    im_start = qwen.convert_tokens_to_ids("<|im_start|>")
    ids = qwen.encode("<think>\nhmm\n</think>\n\nA <|eot_id|> B", add_special_tokens=False)
    assert qwen.convert_tokens_to_ids("<think>") in ids  # Qwen3's <think> is a non-special added token...
    ids = ids[:3] + [im_start] + ids[3:] + [qwen.convert_tokens_to_ids("<|im_end|>")]
    view = builders[("qwen3", "llama3_1")].build(CONVERSATION, ids)
    a, t_table = view.alignment, token_bytes(llama)
    # ...so the teacher reads its bytes as text, and a literal "<|eot_id|>" in the text stays text too.
    assert t_table.bytes_of(view.response_ids[:-1]) == b"<think>\nhmm\n</think>\n\nA <|eot_id|> B"
    assert view.response_ids.count(llama.convert_tokens_to_ids("<|eot_id|>")) == 1
    # A student control token in mid-response spells nothing; the teacher never sees it.
    assert a.reason[3] == Unaligned.SPECIAL and a.student_chunk[3] == -1
    assert (np.delete(a.student_chunk, 3) >= 0).all() and view.eot_mapped
    # A Qwen3 teacher reads "<think>" written by another student as its own <think> token (same bytes).
    ds = toks["deepseek_v3"]
    think = ds.encode("<think>x</think>", add_special_tokens=False)
    view = builders[("deepseek_v3", "qwen3")].build(CONVERSATION, think)
    assert view.response_ids[0] == qwen.convert_tokens_to_ids("<think>") and view.exact_bytes


def test_context_limit(toks):
    qwen, llama = toks["qwen3"], toks["llama3_1"]
    text = RESPONSES["unicode_code"]
    response = qwen.encode(text, add_special_tokens=False) + [qwen.convert_tokens_to_ids("<|im_end|>")]
    full = TeacherViewBuilder(qwen, llama).build(CONVERSATION, response)
    n_prompt, n_t = full.response_start, len(full.response_ids)

    fits = TeacherViewBuilder(qwen, llama, max_teacher_tokens=n_prompt + n_t).build(CONVERSATION, response)
    assert fits.input_ids == full.input_ids and fits.eot_mapped and fits.teacher_truncated_tokens == 0

    # Room for every text token but not the end of turn: the EOT is dropped (and counted), the text stays.
    tight = TeacherViewBuilder(qwen, llama, max_teacher_tokens=n_prompt + n_t - 1)
    view = tight.build(CONVERSATION, response)
    assert view.input_ids == full.input_ids[:-1]
    assert not view.eot_mapped and view.teacher_truncated_tokens == 1
    assert view.alignment.reason[-1] == Unaligned.TEACHER_CONTEXT
    assert (view.alignment.student_chunk[:-1] >= 0).all()

    keep = 10
    cut = TeacherViewBuilder(qwen, llama, max_teacher_tokens=n_prompt + keep).build(CONVERSATION, response)
    assert len(cut.input_ids) == n_prompt + keep and cut.input_ids == full.input_ids[: n_prompt + keep]
    assert cut.teacher_truncated_tokens == n_t - keep  # text tokens past the limit + the EOT
    a = cut.alignment
    unaligned = a.student_chunk < 0
    assert unaligned.any() and (a.reason[unaligned] == Unaligned.TEACHER_CONTEXT).all()
    first_lost = int(np.flatnonzero(unaligned)[0])
    assert (a.student_chunk[:first_lost] >= 0).all() and unaligned[first_lost:].all()
    assert a.stats().unaligned_by_reason["teacher_context"] == len(response) - first_lost

    with pytest.raises(SampleError, match=r"sample 9: .*max_teacher_tokens"):
        limited = TeacherViewBuilder(qwen, llama, max_teacher_tokens=n_prompt)
        limited.build(CONVERSATION, response, sample_id=9)

    same = TeacherViewBuilder(qwen, qwen, max_teacher_tokens=len(oracle_prompt_ids(qwen, CONVERSATION)) + 5)
    view = same.build(CONVERSATION, response)
    assert view.response_ids == response[:5] and view.teacher_truncated_tokens == len(response) - 5
    assert not view.eot_mapped and (view.alignment.reason[5:] == Unaligned.TEACHER_CONTEXT).all()


def test_system_prompt_policies(toks):
    qwen, llama = toks["qwen3"], toks["llama3_1"]
    no_system = CONVERSATION[1:]
    keep = TeacherViewBuilder(qwen, llama).teacher_prompt_ids(CONVERSATION)
    assert keep == oracle_prompt_ids(llama, CONVERSATION)
    for policy in ("drop", "teacher_default"):
        b = TeacherViewBuilder(qwen, llama, system_prompt=policy)
        assert b.teacher_prompt_ids(CONVERSATION) == oracle_prompt_ids(llama, no_system)
        text = b.teacher_prompt_text(CONVERSATION)
        assert "Réponds" not in text and "system" not in text  # this Llama-3.1 template has no default
    with pytest.raises(SampleError, match="only a system message"):
        TeacherViewBuilder(qwen, llama, system_prompt="drop").build(CONVERSATION[:1], [], sample_id=3)


def test_template_kwargs_and_tools(toks):
    qwen, llama = toks["qwen3"], toks["llama3_1"]
    b = TeacherViewBuilder(llama, qwen, template_kwargs={"enable_thinking": False})
    assert b.teacher_prompt_text(CONVERSATION).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert b.teacher_prompt_ids(CONVERSATION) == oracle_prompt_ids(qwen, CONVERSATION, enable_thinking=False)
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    function = {"name": "get_weather", "description": "Weather", "parameters": schema}
    tools = [{"type": "function", "function": function}]
    view = TeacherViewBuilder(llama, qwen).build(CONVERSATION, [], tools=tools)
    assert view.prompt_ids == oracle_prompt_ids(qwen, CONVERSATION, tools=tools)
    assert "get_weather" in view.prompt_text


def test_string_prompt_and_completion_format(toks):
    qwen, llama = toks["qwen3"], toks["llama3_1"]
    chat = TeacherViewBuilder(qwen, llama)
    assert chat.teacher_prompt_ids("Hi?") == oracle_prompt_ids(llama, [{"role": "user", "content": "Hi?"}])

    comp = TeacherViewBuilder(qwen, llama, prompt_format="completion")
    bos = llama.bos_token_id
    prompt = "Q: 2+2?\nA:"
    assert comp.teacher_prompt_ids(prompt) == [bos] + llama.encode(prompt, add_special_tokens=False)
    text = "".join(m["content"] + "\n\n" for m in CONVERSATION)
    assert comp.teacher_prompt_text(CONVERSATION) == text
    assert comp.teacher_eot_ids == (llama.eos_token_id,)
    response = qwen.encode(" 4", add_special_tokens=False) + [qwen.convert_tokens_to_ids("<|im_end|>")]
    view = comp.build("Q: 2+2?\nA:", response)
    assert view.response_ids == llama.encode(" 4", add_special_tokens=False) + [llama.eos_token_id]
    assert view.eot_mapped

    roles = TeacherViewBuilder(
        qwen, llama, prompt_format="completion", completion_template="{role}: {content}\n",
        system_prompt="drop",
    )
    assert roles.teacher_prompt_text(CONVERSATION[:2]) == "user: " + CONVERSATION[1]["content"] + "\n"
    # A tokenizer whose encode adds no BOS (DeepSeek-V3 here) gets no prefix.
    ds = toks["deepseek_v3"]
    ds_comp = TeacherViewBuilder(qwen, ds, prompt_format="completion")
    assert ds_comp.teacher_prompt_ids("abc") == ds.encode("abc", add_special_tokens=True)


def test_end_of_turn_overrides(toks):
    qwen, llama = toks["qwen3"], toks["llama3_1"]
    response = qwen.encode("ok", add_special_tokens=False) + [qwen.convert_tokens_to_ids("<|im_end|>")]
    view = TeacherViewBuilder(qwen, llama, end_of_turn="<|end_of_text|>").build(CONVERSATION, response)
    assert view.response_ids[-1] == llama.convert_tokens_to_ids("<|end_of_text|>") and view.eot_mapped
    text_end = TeacherViewBuilder(qwen, llama, end_of_turn="\n\nUser:")  # not one token: encoded as text
    assert list(text_end.teacher_eot_ids) == llama.encode("\n\nUser:", add_special_tokens=False)
    two = [llama.convert_tokens_to_ids("<|eot_id|>"), llama.convert_tokens_to_ids("<|end_of_text|>")]
    view = TeacherViewBuilder(qwen, llama, end_of_turn=two).build(CONVERSATION, response)
    assert view.response_ids[-2:] == two
    last = view.alignment.student_chunk[-1]
    assert view.alignment.teacher_chunk[-2:].tolist() == [last, last]
    # "unscored": the student's end of turn stays unscored (a base teacher cannot judge where a turn ends)
    view = TeacherViewBuilder(qwen, llama, end_of_turn="unscored").build(CONVERSATION, response)
    assert not view.eot_mapped and view.eot_ids == ()
    assert view.response_ids == llama.encode("ok", add_special_tokens=False)
    assert view.alignment.student_chunk[-1] == -1 and view.alignment.reason[-1] == Unaligned.SPECIAL
    # Student end ids overridden: <|im_end|> no longer ends the turn, so it stays unaligned (special).
    b = TeacherViewBuilder(qwen, llama, student_end_of_turn=[qwen.convert_tokens_to_ids("<|endoftext|>")])
    view = b.build(CONVERSATION, response)
    assert not view.eot_mapped and view.alignment.reason[-1] == Unaligned.SPECIAL
    assert llama.convert_tokens_to_ids("<|eot_id|>") not in view.response_ids


def test_config_errors(toks):
    qwen = toks["qwen3"]
    base = AutoTokenizer.from_pretrained(str(tokenizer_dir("llama3_1")))
    base.chat_template = None
    with pytest.raises(ConfigError, match='prompt_format="completion"'):
        TeacherViewBuilder(qwen, base)
    TeacherViewBuilder(qwen, base, prompt_format="completion")  # fine for a base teacher
    with pytest.raises(ConfigError) as err:
        TeacherViewBuilder(qwen, qwen, prompt_format="raw", system_prompt="merge", max_teacher_tokens=0)
    assert all(word in str(err.value) for word in ("prompt_format", "system_prompt", "max_teacher_tokens"))
    with pytest.raises(ConfigError, match="completion_template"):
        TeacherViewBuilder(qwen, base, prompt_format="completion", completion_template="{user}: {content}")


@pytest.mark.parametrize(
    "messages,match",
    [
        ({"role": "user", "content": "x"}, "must be a list"),
        ([], "empty list"),
        (["hello"], r"messages\[0\] must be a dict"),
        ([{"content": "x"}], r"messages\[0\] has no string 'role'"),
        ([{"role": "user"}], "has no 'content'"),
        ([{"role": "user", "content": 3}], r"content must be a string"),
    ],
)
def test_malformed_messages(builders, messages, match):
    with pytest.raises(SampleError, match=match) as err:
        builders[("qwen3", "llama3_1")].build(messages, [], sample_id=42)
    assert "sample 42" in str(err.value) and "MessagesDataSource" in str(err.value)


def test_sample_errors(toks, builders):
    b = builders[("qwen3", "gemma3")]
    with pytest.raises(SampleError, match=r"sample 5: response token ids \[999999\] are outside"):
        b.build(CONVERSATION, [1, 999999], sample_id=5)
    two_users = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(SampleError, match="sample 6: the teacher's chat template rejected.*alternate"):
        b.build(two_users, [], sample_id=6)


def test_messages_from_metadata():
    msgs = [{"role": "user", "content": "hi"}]
    assert messages_from_metadata({"messages": msgs}, "messages") == msgs
    assert messages_from_metadata({"opd": {"messages": msgs}}, "opd.messages") == msgs
    assert messages_from_metadata({"opd.messages": msgs}, "opd.messages") == msgs
    assert messages_from_metadata({"messages": '[{"role": "user", "content": "hi"}]'}, "messages") == msgs
    with pytest.raises(SampleError, match=r"sample 3: sample.metadata has no 'messages'.*MessagesDataSource"):
        messages_from_metadata({"tools": []}, "messages", sample_id=3)
    with pytest.raises(SampleError, match="not JSON"):
        messages_from_metadata({"messages": "{oops"}, "messages")
    with pytest.raises(SampleError, match=r"metadata\['messages'\]\[0\] has no string 'role'"):
        messages_from_metadata({"messages": [{"content": "x"}]}, "messages", sample_id=1)
    assert validate_messages([{"role": "assistant", "content": None, "tool_calls": []}])


def test_build_is_thread_safe(toks, builders):
    jobs = []
    pairs = [("qwen3", "gemma3"), ("gemma3", "deepseek_v3")]
    for (s_name, t_name), text in itertools.product(pairs, RESPONSES.values()):
        s_tok = toks[s_name]
        ids = s_tok.encode(text, add_special_tokens=False) + [s_tok.convert_tokens_to_ids(EOT[s_name])]
        jobs.append((builders[(s_name, t_name)], ids))
    jobs = jobs * 8

    def run(job):
        view = job[0].build(CONVERSATION, job[1])
        return view.input_ids, view.alignment.student_chunk.tolist(), view.alignment.teacher_chunk.tolist()

    sequential = [run(job) for job in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(run, jobs)) == sequential


def test_dummy_prefix_teacher(tmp_path, toks):
    """A SentencePiece teacher that adds a dummy prefix (Mistral v3 from mistral-common, no template)."""
    data = Path(importlib.util.find_spec("mistral_common").submodule_search_locations[0]) / "data"
    shutil.copy(next(data.glob("*.model.v3")), tmp_path / "tokenizer.model")
    config = {"tokenizer_class": "LlamaTokenizer", "legacy": False, "bos_token": "<s>", "eos_token": "</s>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    teacher = AutoTokenizer.from_pretrained(str(tmp_path))
    assert token_bytes(teacher).adds_dummy_prefix
    qwen = toks["qwen3"]
    builder = TeacherViewBuilder(
        qwen, teacher, prompt_format="completion", completion_template="[INST] {content} [/INST]"
    )
    for text in ("\nHi 你好", " Hello world", "你好", "Hello world", "Hi\n\nthere"):
        view = builder.build("Q", qwen.encode(text, add_special_tokens=False) + [qwen.eos_token_id])
        # No dummy "▁" reaches the teacher (the response continues the prompt), so the teacher spells the
        # student's bytes exactly, also where the dummy space would have merged into the first word.
        assert token_bytes(teacher).bytes_of(view.response_ids[:-1]) == text.encode() and view.exact_bytes
        assert view.response_ids[-1] == teacher.eos_token_id and view.eot_mapped
        assert view.alignment.stats().covered_fraction == 1.0


def test_generation_config_end_ids(tmp_path, toks):
    """eos_token_id from a generation_config.json next to the tokenizer counts as an end of turn."""
    toks["deepseek_v3"].save_pretrained(str(tmp_path))
    extra = toks["deepseek_v3"].convert_tokens_to_ids("<｜fim▁hole｜>")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, extra]}))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert {1, extra} <= student_end_ids(tok, token_bytes(tok))


@pytest.mark.parametrize("teacher", ["llama3_1", "gemma3"])
def test_roles_the_teacher_template_does_not_handle_are_one_clear_error(builders, teacher):
    b = builders[("qwen3", teacher)]
    robot = [{"role": "user", "content": "hi"}, {"role": "robot", "content": "beep"}, {"role": "user", "content": "?"}]
    with pytest.raises(SampleError, match=r"sample 3: messages\[1\] has role 'robot', which the teacher's chat"):
        b.build(robot, [], sample_id=3)
    with pytest.raises(SampleError, match=r"sample 4: the prompt has no 'user' message \(roles \['assistant'\]\)"):
        b.build([{"role": "assistant", "content": "hello"}], [], sample_id=4)


def test_template_roles_reads_the_roles_a_template_names():
    from slime_xvocab.teacher_view import template_roles

    template = "{% if message['role'] == 'ipython' %}x{% elif message.role == \"developer\" %}y{% endif %}"
    assert template_roles(template) == {"system", "user", "assistant", "tool", "ipython", "developer"}
    assert template_roles(None) == {"system", "user", "assistant", "tool"}
