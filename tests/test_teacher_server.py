"""The reference teacher server, run as a real subprocess, against a direct transformers forward.

A tiny random Llama (vocab 512, hidden 32, 2 layers) is built offline once per session; the server's
log-probs must equal ``log_softmax(model(ids).logits)`` within 1e-5 for single and batched requests and
several ``logprob_start_len`` values, top-k included, and for a compact-vocabulary model with a vocab map.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from slime_xvocab.errors import SampleError, TeacherRequestRejected  # noqa: E402
from slime_xvocab.teacher_client import SyncTeacherClient  # noqa: E402
from slime_xvocab.teacher_server import VOCAB_MAP_FILE, cli_main, start_teacher_server  # noqa: E402

VOCAB = 512
CONTEXT = 128
WORDS = ["<unk>", "<s>", "hello", "world", "the", "teacher", "scores", "tokens", "."]


def make_tiny_llama(path, vocab_size: int, seed: int = 0) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)


def save_word_tokenizer(path) -> None:
    """A tiny whitespace word-level tokenizer that adds <s> (add_special_tokens=True), for AutoTokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", unk_token="<unk>").save_pretrained(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_llama(path, VOCAB)
    save_word_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def compact_model_dir(tmp_path_factory):
    """A model over 64 real ids of a 100k vocabulary + one 'other' slot (model vocab 65)."""
    path = tmp_path_factory.mktemp("compact_llama")
    make_tiny_llama(path, 65, seed=1)
    real = np.random.default_rng(0).choice(100_000, size=64, replace=False)
    (path / VOCAB_MAP_FILE).write_text(json.dumps({"real_ids": real.tolist()}))
    return path


@pytest.fixture(scope="session")
def ref_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    # --max-batch-tokens 128 forces big batches to be split into several forwards.
    args = ["--context-length", str(CONTEXT), "--max-batch-tokens", "128"]
    with start_teacher_server(tiny_model_dir, extra_args=args) as handle:
        yield handle


def full_log_probs(model, ids: list[int]) -> np.ndarray:
    """``[len(ids), vocab]`` log-softmax of a direct forward; row k predicts token k+1."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1).numpy()


def token_log_probs(model, ids: list[int]) -> np.ndarray:
    """``lp[k] = log p(ids[k] | ids[:k])`` for k >= 1 (lp[0] = nan)."""
    lp = full_log_probs(model, ids)
    out = np.full(len(ids), np.nan)
    out[1:] = lp[np.arange(len(ids) - 1), ids[1:]]
    return out


def seq(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, VOCAB, size=n).tolist()


def post(handle, body, **kw) -> httpx.Response:
    return httpx.post(handle.url + "/generate", json=body, timeout=60, trust_env=False, **kw)


def scoring_body(ids, start, **extra) -> dict:
    return {
        "input_ids": ids,
        "logprob_start_len": start,
        "return_logprob": True,
        "sampling_params": {"max_new_tokens": 0, "temperature": 1.0},
        **extra,
    }


# ---------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("start", [0, 1, 7, 18, 19, 20])
def test_single_request_matches_transformers(server, ref_model, start):
    ids = seq(20, 1)
    r = post(server, scoring_body(ids, start))
    assert r.status_code == 200, r.text
    meta = r.json()["meta_info"]
    itl = meta["input_token_logprobs"]
    assert meta["prompt_tokens"] == 20 and len(itl) == 20 - start
    assert r.json()["text"] == "" and r.json()["output_ids"] == [] and meta["completion_tokens"] == 0
    assert meta["finish_reason"] == {"type": "length", "length": 0} and meta["output_token_logprobs"] == []
    assert "cached_tokens" in meta and "e2e_latency" in meta and "id" in meta
    if itl:
        assert itl[0][0] is None
        assert [e[1] for e in itl] == ids[start:]
        assert all(e[2] is None for e in itl)
        ref = token_log_probs(ref_model, ids)[start + 1 :]
        np.testing.assert_allclose([e[0] for e in itl[1:]], ref, rtol=0, atol=1e-5)


def test_batched_request_matches_transformers(server, ref_model):
    seqs = [seq(n, 10 + n) for n in (5, 40, 17, 33, 2)]
    starts = [0, 30, 4, 1, 1]
    r = post(server, scoring_body(seqs, starts, rid="batch"))
    assert r.status_code == 200, r.text
    answers = r.json()
    assert isinstance(answers, list) and len(answers) == 5
    for i, (ids, s, a) in enumerate(zip(seqs, starts, answers, strict=True)):
        itl = a["meta_info"]["input_token_logprobs"]
        assert a["meta_info"]["id"] == f"batch_{i}" and a["meta_info"]["prompt_tokens"] == len(ids)
        assert [e[1] for e in itl] == ids[s:] and itl[0][0] is None
        np.testing.assert_allclose(
            [e[0] for e in itl[1:]], token_log_probs(ref_model, ids)[s + 1 :], rtol=0, atol=1e-5
        )


def test_broadcast_start_and_per_item_sampling_params(server, ref_model):
    seqs = [seq(12, 3), seq(9, 4)]
    body = scoring_body(seqs, 2)
    body["sampling_params"] = [{"max_new_tokens": 0}, {"max_new_tokens": 0, "temperature": 0.7}]
    answers = post(server, body).json()
    for ids, a in zip(seqs, answers, strict=True):
        itl = a["meta_info"]["input_token_logprobs"]
        np.testing.assert_allclose([e[0] for e in itl[1:]], token_log_probs(ref_model, ids)[3:], atol=1e-5)


def test_top_logprobs_match_transformers(server, ref_model):
    ids = seq(15, 5)
    r = post(server, scoring_body(ids, 9, top_logprobs_num=4))
    meta = r.json()["meta_info"]
    top = meta["input_top_logprobs"]
    assert (
        len(top) == len(meta["input_token_logprobs"]) and top[0] is None and meta["output_top_logprobs"] == []
    )
    full = full_log_probs(ref_model, ids)
    for j, entry in enumerate(top[1:]):
        row = full[9 + j]  # the distribution of token 10+j
        best = np.argsort(-row)[:4]
        assert [e[1] for e in entry] == best.tolist()
        np.testing.assert_allclose([e[0] for e in entry], row[best], atol=1e-5)


def temperature_log_probs(model, ids: list[int], temperature: float) -> np.ndarray:
    """``log softmax(logits / T)`` of each next token (sglang#36213's ``input_logprob_temperature``)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float() / temperature
    lp = torch.log_softmax(logits, dim=-1).numpy()
    return lp[np.arange(len(ids) - 1), ids[1:]]


def test_input_logprob_temperature_scales_scores_and_is_echoed(server, ref_model):
    seqs, temps = [seq(14, 31), seq(9, 32)], [0.5, 2.0]
    answers = post(server, scoring_body(seqs, 3, input_logprob_temperature=temps)).json()
    for ids, t, a in zip(seqs, temps, answers, strict=True):
        assert a["meta_info"]["input_logprob_temperature"] == t
        got = [e[0] for e in a["meta_info"]["input_token_logprobs"][1:]]
        np.testing.assert_allclose(got, temperature_log_probs(ref_model, ids, t)[3:], atol=1e-5)
    one = post(server, scoring_body(seqs[0], 3)).json()["meta_info"]  # default: T = 1, echoed as such
    assert one["input_logprob_temperature"] == 1.0
    np.testing.assert_allclose([e[0] for e in one["input_token_logprobs"][1:]],
                               token_log_probs(ref_model, seqs[0])[4:], atol=1e-5)
    with SyncTeacherClient(server.url, temperature=2.0, trust_env=False) as c:
        scores = c.score(seqs[1], 4)
    assert scores.temperature == 2.0
    np.testing.assert_allclose(scores.log_probs, temperature_log_probs(ref_model, seqs[1], 2.0)[3:], atol=1e-5)
    bad = post(server, scoring_body(seqs[0], 3, input_logprob_temperature=0))
    assert bad.status_code == 400 and "input_logprob_temperature" in bad.json()["error"]["message"]


def test_server_without_input_logprob_temperature_ignores_it_like_old_sglang(tiny_model_dir):
    from slime_xvocab.teacher_server import TeacherModel, build_answer, parse_generate_request

    tm = TeacherModel(tiny_model_dir)
    body = scoring_body(seq(10, 33), 2, input_logprob_temperature=3.0)
    (legacy,), _, _ = parse_generate_request(body, tm, input_logprob_temperature=False)
    (current,), _, _ = parse_generate_request(body, tm)
    tm.score([legacy, current])
    assert legacy.temperature == 1.0 and current.temperature == 3.0
    assert "input_logprob_temperature" not in build_answer(legacy, 0.0, False, echo_temperature=False)["meta_info"]
    assert not np.allclose(legacy.result["lps"], current.result["lps"])


def test_client_against_server_batched_and_single(server, ref_model):
    items = [(seq(30, 20 + i), 1 + 5 * i) for i in range(5)]
    with SyncTeacherClient(server.url, batch_size=3, top_logprobs=2, trust_env=False) as c:
        outs = c.score_many(items)
        single = c.score(*items[0])
        assert c.stats()["requests"] == 3
    for (ids, rs), o in zip(items, outs, strict=True):
        np.testing.assert_allclose(o.log_probs, token_log_probs(ref_model, ids)[rs:], atol=1e-5)
        assert len(o.top_log_probs) == len(ids) - rs
    np.testing.assert_allclose(single.log_probs, outs[0].log_probs, atol=1e-6)


def test_concurrent_requests_share_a_forward_and_float64_answers_do_not_depend_on_it(tiny_model_dir, ref_model):
    """SGLang scores concurrent requests together, and so does the reference server (slime's reward hooks send one
    request per sample). With --dtype float64 an answer is the same whether it was scored alone or with others."""
    import asyncio

    bodies = [scoring_body(seq(10 + 3 * i, 40 + i), 2, top_logprobs_num=3) for i in range(12)]
    with start_teacher_server(tiny_model_dir, extra_args=["--dtype", "float64"]) as h:
        alone = [post(h, b).json() for b in bodies]

        async def all_at_once():
            async with httpx.AsyncClient(trust_env=False, timeout=60) as client:
                return await asyncio.gather(*(client.post(h.url + "/generate", json=b) for b in bodies))

        together = [r.json() for r in asyncio.run(all_at_once())]
        calls = httpx.get(h.url + "/server_info", trust_env=False).json()["num_model_calls"]
    assert calls < 2 * len(bodies)  # one call per lone request, fewer for the twelve sent at once
    for body, a, t in zip(bodies, alone, together, strict=True):
        for key in ("input_token_logprobs", "input_top_logprobs"):
            assert a["meta_info"][key] == t["meta_info"][key]
        got = [lp for lp, _, _ in a["meta_info"]["input_token_logprobs"][1:]]  # the first one is None (SGLang)
        np.testing.assert_allclose(got, token_log_probs(ref_model, body["input_ids"])[3:], atol=1e-5)


def test_text_input_is_tokenised_with_special_tokens(server, ref_model):
    body = {
        "text": "hello world the teacher",
        "logprob_start_len": 0,
        "return_logprob": True,
        "sampling_params": {"max_new_tokens": 0},
        "return_prompt_token_ids": True,
    }
    a = post(server, body).json()
    ids = [1, 2, 3, 4, 5]  # <s> hello world the teacher
    assert a["prompt_token_ids"] == ids and a["meta_info"]["prompt_tokens"] == 5
    itl = a["meta_info"]["input_token_logprobs"]
    np.testing.assert_allclose([e[0] for e in itl[1:]], token_log_probs(ref_model, ids)[1:], atol=1e-5)


def test_return_logprob_false_has_no_logprobs(server):
    a = post(server, {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 0}}).json()
    assert "input_token_logprobs" not in a["meta_info"] and a["meta_info"]["prompt_tokens"] == 3


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "body, message",
    [
        ({"input_ids": []}, "input_ids cannot be empty."),
        ({"input_ids": [[1, 2], []]}, "input_ids cannot be empty (batch item 1)."),
        (
            {"input_ids": list(range(CONTEXT + 1))},
            f"The input ({CONTEXT + 1} tokens) is longer than the model's context length ({CONTEXT} tokens).",
        ),
        (
            {"input_ids": [1, 2, 3], "logprob_start_len": 4},
            "req.logprob_start_len=4 is higher than the number of input tokens len(req.origin_input_ids)=3. "
            "Please use a smaller logprob_start_len.",
        ),
        ({"input_ids": [1, VOCAB, 3]}, f"Token id {VOCAB} in input_ids is out of range"),
        ({"input_ids": [1, -1, 3]}, "Token id -1 in input_ids is out of range"),
        (
            {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 5}},
            "only scores (prefill-only): sampling_params.max_new_tokens must be 0, got 5",
        ),
        ({"input_ids": [1, 2], "sampling_params": {}}, "must be 0, got nothing"),
        ({"input_ids": [[1, 2], [3]], "logprob_start_len": [0]}, "logprob_start_len has 1 entries"),
        ({"input_ids": [1, 2], "text": "hi"}, "Either text or input_ids"),
    ],
)
def test_validation_errors_use_sglangs_envelope(server, body, message):
    body = {"sampling_params": {"max_new_tokens": 0}, "return_logprob": True, **body}
    r = post(server, body)
    assert r.status_code == 400
    assert message in r.json()["error"]["message"]


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"input_ids": "abc"}'])
def test_malformed_bodies_get_the_object_error_envelope(server, content):
    r = httpx.post(server.url + "/generate", content=content, trust_env=False, timeout=30)
    assert r.status_code == 400
    body = r.json()
    assert body["object"] == "error" and body["code"] == 400 and body["message"]


def test_client_raises_rejected_with_server_message(server):
    with SyncTeacherClient(server.url, trust_env=False) as c:
        with pytest.raises(
            TeacherRequestRejected, match=r"longer than the model's context length \(128 tokens\)"
        ):
            c.score(list(range(CONTEXT + 5)), 3)
        info = c.server_info()
    with SyncTeacherClient(server.url, trust_env=False, max_input_tokens=info["max_req_input_len"]) as c:
        with pytest.raises(SampleError, match="max_input_tokens=128"):
            c.score(list(range(CONTEXT + 5)), 3)


# ---------------------------------------------------------------------------- info endpoints


def test_info_endpoints(server, tiny_model_dir):
    get = lambda p: httpx.get(server.url + p, trust_env=False, timeout=30)  # noqa: E731
    assert get("/health").status_code == 200 and get("/health_generate").status_code == 200
    for path in ("/server_info", "/get_server_info"):
        info = get(path).json()
        assert info["context_length"] == CONTEXT and info["max_req_input_len"] == CONTEXT
        assert info["tp_size"] == 1 and info["dp_size"] == 1 and info["version"]
        assert info["model_path"] == str(tiny_model_dir.resolve())
        assert info["num_generate_requests"] >= 1
    for path in ("/model_info", "/get_model_info"):
        mi = get(path).json()
        assert mi["model_path"] == str(tiny_model_dir.resolve()) and mi["is_generation"] is True
        assert mi["architectures"] == ["LlamaForCausalLM"]
    models = get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["max_model_len"] == CONTEXT


# ---------------------------------------------------------------------------- compact vocabulary + api key


def test_vocab_map_compact_model_and_api_key(compact_model_dir):
    from transformers import AutoModelForCausalLM

    real = np.array(json.loads((compact_model_dir / VOCAB_MAP_FILE).read_text())["real_ids"])
    model = AutoModelForCausalLM.from_pretrained(compact_model_dir, dtype=torch.float32).eval()
    rng = np.random.default_rng(7)
    unknown = [i for i in range(100_000, 100_010)]  # not in the map: the "other" slot (index 64)
    wire = [int(x) for x in rng.choice(real, size=12)] + unknown[:2] + [int(real[3])]
    model_ids = [int(np.flatnonzero(real == t)[0]) if t in set(real.tolist()) else 64 for t in wire]
    ref = token_log_probs(model, model_ids)
    full = full_log_probs(model, model_ids)
    with start_teacher_server(compact_model_dir, api_key="k3y") as h:
        r = post(h, scoring_body(wire, 0))
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
        r = post(h, scoring_body(wire, 0, top_logprobs_num=3), headers={"Authorization": "Bearer k3y"})
        assert r.status_code == 200, r.text
        meta = r.json()["meta_info"]
        itl = meta["input_token_logprobs"]
        assert [e[1] for e in itl] == wire  # echoed ids stay the real ids
        np.testing.assert_allclose([e[0] for e in itl[1:]], ref[1:], atol=1e-5)
        for j, entry in enumerate(meta["input_top_logprobs"][1:]):
            row = full[j, :64]  # top-k over real tokens only: the "other" slot is left out
            best = np.argsort(-row)[:3]
            assert [e[1] for e in entry] == real[best].tolist()
            np.testing.assert_allclose([e[0] for e in entry], row[best], atol=1e-5)
        with SyncTeacherClient(h.url, api_key="k3y", trust_env=False) as c:
            np.testing.assert_allclose(c.score(wire, 5).log_probs, ref[5:], atol=1e-5)
            assert c.health() == {h.url + "/generate": True}
        text = post(
            h,
            {"text": "hi", "sampling_params": {"max_new_tokens": 0}},
            headers={"Authorization": "Bearer k3y"},
        )
        assert text.status_code == 400 and "no tokenizer" in text.json()["error"]["message"]


def test_cli_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as ei:
        cli_main(["--help"])
    assert ei.value.code == 0
    assert "--max-batch-tokens" in capsys.readouterr().out


def test_cli_missing_or_bad_model_dir_is_one_clear_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    cases = [
        (str(tmp_path / "nope"), "no such directory"),
        (str(tmp_path), "has no config.json"),
    ]
    for model, message in cases:
        res = subprocess.run(
            [sys.executable, "-m", "slime_xvocab.cli", "serve-teacher", "--model", model],
            capture_output=True, text=True, env=env, timeout=120,
        )
        assert res.returncode == 2, res.stderr
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0] and "Traceback" not in res.stderr


def test_cli_version():
    from slime_xvocab import __version__
    from slime_xvocab.cli import main

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    res = subprocess.run(
        [sys.executable, "-m", "slime_xvocab.cli", "--version"], capture_output=True, text=True, env=env, timeout=60
    )
    assert res.returncode == 0 and res.stdout.strip() == f"slime-xvocab {__version__}"
    assert main(["-V"]) == 0
