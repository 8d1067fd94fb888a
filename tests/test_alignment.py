import itertools
import unicodedata

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slime_xvocab.alignment import (
    Alignment,
    Unaligned,
    align_batch,
    align_lengths,
    align_lengths_batch,
    align_response,
    align_spans,
    align_tokens,
    decode_with_byte_map,
    encode_bytes,
    spans_from_lengths,
)
from slime_xvocab.assets import TEST_FAMILIES
from slime_xvocab.credit import assign_credit
from slime_xvocab.errors import ByteMismatchError

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 9:30, isn't it?",
    "code": "def add(a, b):\n\tif a:\n\t\treturn a + b    # sum\n        pass\n\n\n",
    "cjk": "你好，世界。東京タワーに行きました。한국어 텍스트",
    "emoji_zwj": "family 👨‍👩‍👧‍👦 and 🏳️‍🌈 flags 🇯🇵 🤖🎉👍🏽",
    "combining": "e\u0301 a\u0308 n\u0303 ǅ ﬁ",
    "rtl": "مرحبا بالعالم שלום עולם",
    "digits": "12345678901234567890 + 98765 = 3.14159265358979",
    "special_lookalikes": "prose with <|eot_id|> <|im_end|> <end_of_turn> </s> <s> <bos> inside",
    "whitespace": "   leading and trailing   \t\n",
    "empty": "",
    "single_byte": "x",
}

PAIRS = list(itertools.product(TEST_FAMILIES, TEST_FAMILIES))


def encode_student(tok, text: str) -> np.ndarray:
    """What a student might sample: its own canonical tokens for the text (specials kept as text)."""
    return np.asarray(tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"], dtype=np.int64)


def check_partition(alignment: Alignment, s_spans: np.ndarray, t_spans: np.ndarray, exact: bool = True) -> None:
    """Every chunk is contiguous on both sides, chunks are in order, and both sides cover the same bytes."""
    for side_chunk, spans in ((alignment.student_chunk, s_spans), (alignment.teacher_chunk, t_spans)):
        aligned = np.flatnonzero(side_chunk >= 0)
        ids = side_chunk[aligned]
        assert np.all(np.diff(ids) >= 0), "chunks out of order"
        for c in np.unique(ids):
            pos = aligned[ids == c]
            assert np.all(np.diff(pos) == 1) or len(pos) == 1 or _only_zero_width_between(pos, spans)
    for c in range(alignment.num_chunks):
        s = s_spans[alignment.student_chunk == c]
        t = t_spans[alignment.teacher_chunk == c]
        assert len(s) and len(t)
        s_text, t_text = s[s[:, 1] > s[:, 0]], t[t[:, 1] > t[:, 0]]
        # The teacher's spans stay inside the chunk's bytes; with byte-exact encodings both sides start and
        # end the chunk at the same byte (an offset mapping may leave out a trimmed space or an accent that
        # the teacher's normaliser composed into the previous character).
        assert t_text[:, 0].min() >= s_text[:, 0].min() and t_text[:, 1].max() <= s_text[:, 1].max()
        if exact:
            assert s_text[:, 0].min() == t_text[:, 0].min() and s_text[:, 1].max() == t_text[:, 1].max()


def _only_zero_width_between(pos, spans):
    gaps = [k for a, b in zip(pos[:-1], pos[1:]) for k in range(a + 1, b)]
    return all(spans[k, 1] == spans[k, 0] for k in gaps)


@pytest.mark.parametrize("student,teacher", PAIRS)
def test_every_pair_every_text(student, teacher, tokenizers, tables):
    s_tok, s_tab, t_tok, t_tab = tokenizers[student], tables[student], tokenizers[teacher], tables[teacher]
    rng = np.random.default_rng(0)
    for name, text in TEXTS.items():
        s_ids = encode_student(s_tok, text)
        data = s_tab.bytes_of(s_ids)
        enc, alignment = align_response(s_ids, s_tab, t_tok, t_tab)
        # The byte check: the teacher sees exactly the student's bytes (or their NFC form).
        t_text = t_tab.bytes_of(enc.ids).decode()
        if enc.exact:
            assert t_tab.bytes_of(enc.ids) == data, (name, student, teacher)
        else:
            assert unicodedata.normalize("NFC", t_text) == unicodedata.normalize("NFC", data.decode()), name
        stats = alignment.stats()
        assert stats.covered_fraction == 1.0, (name, student, teacher, stats)
        check_partition(alignment, spans_from_lengths(s_tab.lengths_of(s_ids)), enc.spans, enc.exact)

        teacher_lp = -rng.random(len(enc.ids)) * 5
        student_lp = -rng.random(len(s_ids)) * 5
        for split in ("uniform", "proportional"):
            values = assign_credit(alignment, teacher_lp, student_lp, mode="chunk", split=split)
            assert values.dtype == np.float32 and values.shape == (len(s_ids),)
            assert values.sum() == pytest.approx(teacher_lp.sum(), abs=1e-4), (name, split)
        exact = assign_credit(alignment, teacher_lp, student_lp, mode="exact")
        one = alignment.one_to_one()
        t_of = {c: i for i, c in enumerate(alignment.teacher_chunk) if c >= 0}
        for j in range(len(s_ids)):
            if one[j]:
                assert exact[j] == np.float32(teacher_lp[t_of[alignment.student_chunk[j]]])
            else:
                assert exact[j] == np.float32(student_lp[j])


def test_same_tokenizer_is_all_one_to_one(tokenizers, tables):
    for family in TEST_FAMILIES:
        ids = encode_student(tokenizers[family], TEXTS["emoji_zwj"] + TEXTS["code"])
        alignment = align_tokens(ids, ids, tables[family], tables[family])
        assert alignment.stats().one_to_one_fraction == 1.0
        lp = -np.arange(1, len(ids) + 1, dtype=np.float64) / 7
        for mode in ("chunk", "exact"):
            np.testing.assert_array_equal(assign_credit(alignment, lp, lp * 2, mode=mode), lp.astype(np.float32))


def test_digits_group_into_chunks():
    # "347 + 85": Qwen3-style digits against Llama-3-style groups (spans are all we need).
    student = spans_from_lengths(np.array([1, 1, 1, 2, 2, 1]))  # 3 4 7 ␣+ ␣8 5
    teacher = spans_from_lengths(np.array([3, 2, 3]))  # 347 ␣+ ␣85
    a = align_spans(student, teacher)
    assert a.student_chunk.tolist() == [0, 0, 0, 1, 2, 2]
    assert a.teacher_chunk.tolist() == [0, 1, 2]
    assert a.one_to_one().tolist() == [False, False, False, True, False, False]
    s = a.stats()
    assert (s.chunks, s.max_chunk_width, s.one_to_one_tokens, s.covered_tokens) == (3, 3, 1, 6)
    assert s.mean_chunk_width == pytest.approx(2.0)


def test_credit_splits_conserve_the_chunk_delta():
    a = align_spans(spans_from_lengths(np.array([1, 1, 1])), spans_from_lengths(np.array([3])))
    student = np.array([-0.5, -1.0, -1.5])
    teacher = np.array([-6.0])
    uniform = assign_credit(a, teacher, student, split="uniform")
    np.testing.assert_allclose(uniform, student + (-6.0 + 3.0) / 3, rtol=1e-6)
    proportional = assign_credit(a, teacher, student, split="proportional")
    np.testing.assert_allclose(proportional, student * 2.0, rtol=1e-6)
    # A chunk the student found certain (log-prob 0) falls back to the uniform split.
    zero = assign_credit(a, teacher, np.zeros(3), split="proportional")
    np.testing.assert_allclose(zero, [-2.0, -2.0, -2.0], rtol=1e-6)


def test_special_tokens_are_unaligned_and_keep_student_values(tokenizers, tables):
    tok, tab = tokenizers["qwen3"], tables["qwen3"]
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    ids = np.concatenate([encode_student(tok, "Hi there"), [eot]])
    enc, a = align_response(ids, tab, tokenizers["llama3_1"], tables["llama3_1"])
    assert a.reason[-1] == Unaligned.SPECIAL and a.student_chunk[-1] == -1
    student = -np.ones(len(ids)) * 0.25
    out = assign_credit(a, -np.ones(len(enc.ids)), student)
    assert out[-1] == np.float32(-0.25)
    assert out.sum() == pytest.approx(-len(enc.ids) - 0.25, abs=1e-5)


def test_with_pair_adds_an_end_of_turn_chunk():
    a = align_spans(spans_from_lengths(np.array([2, 0])), spans_from_lengths(np.array([2])))
    b = Alignment(a.student_chunk, np.append(a.teacher_chunk, -1), a.reason, a.num_chunks).with_pair([1], [1])
    assert b.student_chunk.tolist() == [0, 1] and b.teacher_chunk.tolist() == [0, 1]
    out = assign_credit(b, np.array([-1.0, -0.1]), np.array([-2.0, -3.0]), mode="exact")
    np.testing.assert_allclose(out, [-1.0, -0.1], rtol=1e-6)
    with pytest.raises(ValueError):
        b.with_pair([1], [1])


def test_teacher_context_limit_leaves_the_tail_unaligned(tokenizers, tables):
    s_tok, s_tab = tokenizers["qwen3"], tables["qwen3"]
    ids = encode_student(s_tok, TEXTS["english"])
    enc, a = align_response(ids, s_tab, tokenizers["gemma3"], tables["gemma3"], max_teacher_tokens=5)
    assert len(enc.ids) == 5
    stats = a.stats()
    assert 0 < stats.covered_tokens < len(ids)
    assert stats.unaligned_by_reason == {"teacher_context": len(ids) - stats.covered_tokens}
    teacher_lp = -np.ones(5)
    student_lp = -np.full(len(ids), 0.5)
    out = assign_credit(a, teacher_lp, student_lp)
    tail = a.student_chunk < 0
    np.testing.assert_array_equal(out[tail], np.float32(-0.5))


def test_invalid_utf8_is_left_out(tokenizers, tables):
    """A response cut in the middle of an emoji: the broken bytes get no teacher signal, the rest does."""
    s_tok, s_tab = tokenizers["llama3_1"], tables["llama3_1"]
    ids = list(encode_student(s_tok, "ok 🤖"))
    pieces = [s_tab.bytes_of([i]) for i in ids]
    assert len(pieces[-1]) < 4 or len(ids) >= 3  # Llama-3 splits the emoji into byte pieces
    truncated = np.array(ids[:-1])
    data = s_tab.bytes_of(truncated)
    text, starts, invalid = decode_with_byte_map(data)
    assert invalid.any() and text.startswith("ok")
    assert starts[-1] == len(data)
    enc, a = align_response(truncated, s_tab, tokenizers["gemma3"], tables["gemma3"])
    assert Unaligned.INVALID_UTF8 in a.reason.tolist()
    assert a.student_chunk[0] >= 0  # "ok" still aligned


def test_byte_mismatch_says_where_and_why(tokenizers, tables):
    s, t = tables["qwen3"], tables["llama3_1"]
    s_ids = encode_student(tokenizers["qwen3"], "naïve café")
    t_ids = encode_student(tokenizers["llama3_1"], "naive café")
    with pytest.raises(ByteMismatchError, match=r"sample 7: .*differ at byte 2"):
        align_tokens(s_ids, t_ids, s, t, sample=7)
    nfd = encode_student(tokenizers["llama3_1"], unicodedata.normalize("NFD", "naïve"))
    with pytest.raises(ByteMismatchError, match="NFC"):
        align_tokens(encode_student(tokenizers["llama3_1"], "naïve"), nfd, t, t)


def test_normalising_teacher_maps_back_through_offsets(tokenizers, tables):
    """Qwen3 composes NFD accents; its tokens then spell other bytes, yet every student token aligns."""
    text = unicodedata.normalize("NFD", "crème brûlée, naïve café")
    s_ids = encode_student(tokenizers["llama3_1"], text)
    enc, a = align_response(s_ids, tables["llama3_1"], tokenizers["qwen3"], tables["qwen3"])
    assert not enc.exact
    assert a.stats().covered_fraction == 1.0


def test_special_token_lookalikes_stay_text_for_the_teacher(tokenizers, tables):
    enc = encode_bytes(tokenizers["llama3_1"], tables["llama3_1"], b"say <|eot_id|> now")
    assert tokenizers["llama3_1"].convert_tokens_to_ids("<|eot_id|>") not in enc.ids.tolist()
    assert enc.exact


# ---- what a per-token-decode aligner (PR #2032's approach) loses ------------------------------------


def naive_decode_alignment(s_tok, t_tok, s_ids, t_ids) -> int:
    """Count 1:1 matches the way a per-token-decode aligner does (decoded prefixes must agree)."""
    S = [s_tok.decode([i], clean_up_tokenization_spaces=False) for i in s_ids]
    T = [t_tok.decode([i], clean_up_tokenization_spaces=False) for i in t_ids]
    i = j = matched = 0
    tp = sp = ""
    while i < len(T) and j < len(S):
        if tp == sp and T[i] == S[j]:
            matched += 1
            tp, sp, i, j = tp + T[i], sp + S[j], i + 1, j + 1
        elif len(tp) > len(sp):
            sp, j = sp + S[j], j + 1
        elif len(tp) < len(sp):
            tp, i = tp + T[i], i + 1
        else:
            tp, sp, i, j = tp + T[i], sp + S[j], i + 1, j + 1
    return matched


def test_naive_per_token_decode_loses_sync_after_multibyte_text(tokenizers, tables):
    text = "中文 🤖 then a long English sentence that both tokenizers split the same way."
    s_tok, t_tok = tokenizers["llama3_1"], tokenizers["gemma3"]
    s_ids = encode_student(s_tok, text)
    enc, a = align_response(s_ids, tables["llama3_1"], t_tok, tables["gemma3"])
    naive = naive_decode_alignment(s_tok, t_tok, s_ids, enc.ids)
    ours = int(a.one_to_one().sum())
    assert a.stats().covered_fraction == 1.0
    assert ours >= 10 and naive <= ours // 3, (naive, ours)


# ---- property tests ---------------------------------------------------------------------------------

HYPO_PAIRS = [("qwen3", "llama3_1"), ("gemma3", "gpt2"), ("mistral_tekken", "gemma3"), ("deepseek_v3", "qwen3")]


def reference_alignment(s_spans: np.ndarray, t_spans: np.ndarray) -> list[tuple[int, int]]:
    """Obvious two-pointer reference for disjoint, contiguous, non-empty spans: chunk end positions."""
    i = j = 0
    chunks = []
    while i < len(s_spans) and j < len(t_spans):
        si, tj = i, j
        while s_spans[i, 1] != t_spans[j, 1]:
            if s_spans[i, 1] < t_spans[j, 1]:
                i += 1
            else:
                j += 1
        chunks.append((i - si + 1, j - tj + 1))
        i, j = i + 1, j + 1
    return chunks


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60), cut_seed=st.integers(0, 2**31 - 1), pair=st.sampled_from(HYPO_PAIRS))
def test_random_unicode_and_random_student_tokenizations(tokenizers, tables, text, cut_seed, pair):
    """Any text, tokenized by the student in pieces (non-canonical, as sampling produces): invariants hold."""
    student, teacher = pair
    s_tok, s_tab, t_tok, t_tab = tokenizers[student], tables[student], tokenizers[teacher], tables[teacher]
    rng = np.random.default_rng(cut_seed)
    cuts = sorted(set(rng.integers(0, len(text) + 1, size=rng.integers(0, 4)).tolist()))
    parts = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    s_ids = np.concatenate([encode_student(s_tok, p) for p in parts] + [np.zeros(0, dtype=np.int64)])
    data = s_tab.bytes_of(s_ids)
    enc, a = align_response(s_ids, s_tab, t_tok, t_tab)
    s_spans = spans_from_lengths(s_tab.lengths_of(s_ids))
    check_partition(a, s_spans, enc.spans, enc.exact)
    stats = a.stats()
    reasons = set(np.unique(a.reason).tolist()) - {0}
    # Everything the teacher saw as text is aligned; only text the normaliser dropped can be left out.
    assert reasons <= {Unaligned.NO_TEACHER_TOKENS}, reasons
    if enc.exact:
        assert t_tab.bytes_of(enc.ids) == data
        s_text = s_spans[s_spans[:, 1] > s_spans[:, 0]]
        t_text = enc.spans[enc.spans[:, 1] > enc.spans[:, 0]]
        expected = reference_alignment(s_text, t_text)
        s_sizes, t_sizes = a.chunk_sizes()
        assert list(zip(s_sizes.tolist(), t_sizes.tolist())) == expected
        assert stats.covered_fraction == 1.0
    teacher_lp = -rng.random(len(enc.ids)) * 3
    student_lp = -rng.random(len(s_ids)) * 3
    values = assign_credit(a, teacher_lp, student_lp)
    covered_t = a.teacher_chunk >= 0
    unaligned = a.student_chunk < 0
    assert values.sum() == pytest.approx(teacher_lp[covered_t].sum() + student_lp[unaligned].sum(), abs=1e-3)
    np.testing.assert_array_equal(values[unaligned], student_lp[unaligned].astype(np.float32))


def test_batch_alignment_equals_sample_by_sample(tokenizers, tables):
    s_tok, s_tab, t_tok, t_tab = tokenizers["qwen3"], tables["qwen3"], tokenizers["gemma3"], tables["gemma3"]
    s_ids = [encode_student(s_tok, text) for text in TEXTS.values()]
    singles = [align_response(ids, s_tab, t_tok, t_tab) for ids in s_ids]
    batch = align_batch(
        [spans_from_lengths(s_tab.lengths_of(ids)) for ids in s_ids], [enc.spans for enc, _ in singles]
    )
    exact_batch = align_lengths_batch([s_tab.lengths_of(ids) for ids in s_ids],
                                      [t_tab.lengths_of(enc.ids) for enc, _ in singles])
    rng = np.random.default_rng(3)
    t_lps = [-rng.random(len(enc.ids)) for enc, _ in singles]
    s_lps = [-rng.random(len(ids)) for ids in s_ids]
    values = batch.assign_credit(t_lps, s_lps)
    for i, (_, single) in enumerate(singles):
        for got in (batch[i], exact_batch[i]):
            np.testing.assert_array_equal(got.student_chunk, single.student_chunk)
            np.testing.assert_array_equal(got.teacher_chunk, single.teacher_chunk)
            np.testing.assert_array_equal(got.reason, single.reason)
        assert batch.stats()[i] == single.stats()
        np.testing.assert_array_equal(values[i], assign_credit(single, t_lps[i], s_lps[i]))


@pytest.mark.parametrize("family", TEST_FAMILIES)
def test_direct_encode_equals_the_transformers_call(family, tokenizers):
    """_encode_text goes straight to the Rust tokenizer where that is the same call: same ids and offsets as
    tokenizer(text, split_special_tokens=True, ...) on every test text and on random text, before and after
    a call that parses special tokens (which flips the shared flag back)."""
    from slime_xvocab.alignment import _direct_backend, _encode_text, _offset_array

    tok = tokenizers[family]
    assert _direct_backend(tok) is not None  # every test family is a plain TokenizersBackend
    rng = np.random.default_rng(7)
    alphabet = list("ab Z9 \t\n.,'<|>_") + ["é", "你", "🤖", "\u0301", "ﬁ", "<|eot_id|>", "<|im_end|>", "</s>"]
    texts = list(TEXTS.values()) + ["".join(rng.choice(alphabet, size=rng.integers(1, 30))) for _ in range(60)]
    for i, text in enumerate(texts):
        if i % 7 == 0:
            tok("<|im_end|> parsed", add_special_tokens=False)  # another caller's settings in between
        want = tok(text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)
        ids, offsets = _encode_text(tok, text)
        assert ids.tolist() == want["input_ids"], (family, text)
        assert _offset_array(offsets).tolist() == [list(o) for o in want["offset_mapping"]], (family, text)


def test_single_sample_lengths_path_equals_the_batch_path():
    """align_lengths (one sample, few numpy calls) against align_lengths_batch and align_spans on random
    tokenizations of random byte strings, special (zero-length) tokens included on both sides."""
    rng = np.random.default_rng(11)

    def cut(n_bytes: int) -> np.ndarray:
        """Random token byte lengths spelling ``n_bytes`` bytes, with a few zero-length tokens inserted."""
        inner = np.arange(1, n_bytes)
        points = np.sort(rng.choice(inner, size=rng.integers(0, len(inner) + 1), replace=False))
        lengths = np.diff(np.concatenate([[0], points, [n_bytes]])) if n_bytes else np.zeros(0, np.int64)
        specials = rng.integers(0, len(lengths) + 1, size=rng.integers(0, 3))
        return np.insert(lengths, specials, 0).astype(np.int64)

    for _ in range(500):
        n_bytes = int(rng.integers(0, 40))
        s_len, t_len = cut(n_bytes), cut(n_bytes)
        got = align_lengths(s_len, t_len)
        for want in (align_lengths_batch([s_len], [t_len])[0], align_spans(spans_from_lengths(s_len),
                                                                           spans_from_lengths(t_len))):
            np.testing.assert_array_equal(got.student_chunk, want.student_chunk)
            np.testing.assert_array_equal(got.teacher_chunk, want.teacher_chunk)
            np.testing.assert_array_equal(got.reason, want.reason)
            assert got.num_chunks == want.num_chunks
            assert (got.student_chunk.dtype, got.teacher_chunk.dtype, got.reason.dtype) == (
                want.student_chunk.dtype, want.teacher_chunk.dtype, want.reason.dtype)
    with pytest.raises(ByteMismatchError):
        align_lengths(np.array([2, 1]), np.array([2]))


def test_teacher_that_deletes_text_gets_no_signal_there(tokenizers, tables):
    """A normaliser that deletes characters (here: tabs) must not pass the teacher's score off as the
    student's text; only the chunks it rewrote are dropped, as byte mismatches."""
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    from slime_xvocab.assets import tokenizer_dir

    teacher = AutoTokenizer.from_pretrained(str(tokenizer_dir("llama3_1")))
    teacher.backend_tokenizer.normalizer = normalizers.Replace("\t", "")
    t_tab = tables["llama3_1"]
    s_ids = encode_student(tokenizers["qwen3"], "keep this\tdrop\tthat, fine")
    enc, a = align_response(s_ids, tables["qwen3"], teacher, t_tab)
    assert not enc.exact
    reasons = a.stats().unaligned_by_reason
    assert set(reasons) == {"byte_mismatch"}
    assert 0 < reasons["byte_mismatch"] < len(s_ids)
    assert a.student_chunk[0] >= 0  # "keep" still aligned
    values = assign_credit(a, -np.ones(len(enc.ids)), -np.full(len(s_ids), 0.5))
    np.testing.assert_array_equal(values[a.student_chunk < 0], np.float32(-0.5))
