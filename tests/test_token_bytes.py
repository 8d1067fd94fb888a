import numpy as np
import pytest

from slime_xvocab.assets import TEST_FAMILIES
from slime_xvocab.errors import TokenizerError
from slime_xvocab.token_bytes import PROBE_TEXT, token_bytes

TEXTS = [
    "plain English, with punctuation!",
    "def f(x):\n\tif x:\n\t\treturn  x   # trailing   \n",
    "你好，世界。東京タワーに行きました。",
    "family 👨‍👩‍👧‍👦 flags 🇯🇵 🤖🎉",
    "e\u0301 a\u0308 combining marks",
    "مرحبا بالعالم שלום עולם",
    "12345678901234567890 3.14159",
    "   leading and trailing whitespace   ",
]


@pytest.mark.parametrize("family", TEST_FAMILIES)
def test_table_spells_what_the_tokenizer_decodes(family, tokenizers, tables):
    tok, table = tokenizers[family], tables[family]
    for text in TEXTS:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        spelled = table.bytes_of(ids).decode("utf-8")
        decoded = tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        assert spelled == decoded, (family, text)


@pytest.mark.parametrize("family", TEST_FAMILIES)
def test_split_characters_keep_their_bytes(family, tokenizers, tables):
    """Byte pieces of one emoji must each carry their raw bytes, not U+FFFD."""
    tok, table = tokenizers[family], tables[family]
    ids = tok("🤖🎉", add_special_tokens=False)["input_ids"]
    pieces = [table.bytes_of([i]) for i in ids]
    assert b"".join(pieces) == "🤖🎉".encode()
    assert all(b"\xef\xbf\xbd" not in p for p in pieces)


@pytest.mark.parametrize("family", TEST_FAMILIES)
def test_special_tokens_spell_nothing_and_are_flagged(family, tokenizers, tables):
    tok, table = tokenizers[family], tables[family]
    for token_id in tok.all_special_ids:
        assert table.special[token_id]
        assert table.bytes_of([token_id]) == b""
    assert table.lengths_of(tok.all_special_ids).sum() == 0


def test_qwen3_think_is_text_not_special(tokenizers, tables):
    tok, table = tokenizers["qwen3"], tables["qwen3"]
    think = tok.convert_tokens_to_ids("<think>")
    assert not table.special[think]
    assert table.bytes_of([think]) == b"<think>"


def test_sentencepiece_space_and_byte_fallback(tokenizers, tables):
    tok, table = tokenizers["gemma3"], tables["gemma3"]
    assert table.scheme == "sentencepiece"
    assert table.bytes_of(tok.convert_tokens_to_ids(["▁hello"])) == b" hello"
    byte_piece = tok.convert_tokens_to_ids("<0xF0>")
    assert table.bytes_of([byte_piece]) == b"\xf0"


def test_vectorised_gather_matches_per_token_concatenation(tables):
    table = tables["llama3_1"]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, table.vocab_size, size=2000)
    expected = b"".join(table.blob[table.offsets[i]:table.offsets[i + 1]].tobytes() for i in ids)
    assert table.bytes_of(ids) == expected
    assert table.lengths_of(ids).sum() == len(expected)


def test_out_of_range_ids_are_rejected_with_a_clear_error(tables):
    table = tables["gpt2"]
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        table.bytes_of([1, table.vocab_size + 5])


def test_table_is_cached_per_tokenizer(tokenizers, tables):
    assert token_bytes(tokenizers["qwen3"]) is tables["qwen3"]


def test_probe_text_round_trips(tokenizers, tables):
    for family in TEST_FAMILIES:
        ids = tokenizers[family](PROBE_TEXT, add_special_tokens=False)["input_ids"]
        assert tables[family].bytes_of(ids).decode() in (PROBE_TEXT, PROBE_TEXT.replace("e\u0301", "é"))


@pytest.mark.parametrize("family", TEST_FAMILIES)
def test_short_join_and_long_gather_spell_the_same_bytes(family, tables):
    """bytes_of joins Python bytes for a few ids and gathers with numpy for many: both give the same bytes."""
    from slime_xvocab import token_bytes as module

    table = tables[family]
    rng = np.random.default_rng(5)
    for n in (0, 1, 2, 7, 33, module._JOIN_BELOW, module._JOIN_BELOW + 1, 700):
        ids = rng.integers(0, table.vocab_size, n)
        gathered = table.blob[np.concatenate([np.arange(table.offsets[i], table.offsets[i + 1]) for i in ids])
                              ] if n else np.zeros(0, np.uint8)
        for given in (ids, ids.tolist()):
            assert table.bytes_of(given) == gathered.tobytes()
        np.testing.assert_array_equal(table.lengths_of(ids), np.diff(table.offsets)[ids])
    for bad in ([0, -1], [table.vocab_size], np.array([1, table.vocab_size + 5])):
        with pytest.raises(TokenizerError):
            table.bytes_of(bad)
