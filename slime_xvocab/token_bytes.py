"""The exact UTF-8 bytes each token id contributes to running text.

Decoding tokens one by one is lossy: a byte-level BPE piece that holds half of a multi-byte character
decodes to U+FFFD, and a SentencePiece piece loses its leading space. Both break any alignment built on
per-token strings. Instead, :func:`token_bytes` reads the tokenizer's vocabulary once and derives every
token's bytes from the tokenizer's own decoding rules:

* byte-level BPE (GPT-2, Llama-3, Qwen, DeepSeek, SmolLM2, Mistral tekken, tiktoken conversions): each
  character of a piece stands for one byte through the GPT-2 byte alphabet;
* SentencePiece style (Gemma, Llama-2, Mistral v1-v3, Phi-3): ``▁`` is a space and ``<0xNN>`` pieces are
  raw bytes (byte fallback);
* added tokens: special ones (BOS, EOS, end of turn, role markers) contribute no bytes and are flagged;
  the others spell their content through the same decoder (Qwen3's ``<think>`` is plain text).

The table is verified against the tokenizer's own ``decode`` on a probe text before it is returned, and
cached per tokenizer object, so per-sample work is array indexing.

Example:
    >>> table = token_bytes(qwen3_tokenizer)
    >>> ids = qwen3_tokenizer.encode(" 🤖", add_special_tokens=False)     # 3 pieces, one character
    >>> [table.bytes_of([i]) for i in ids]
    [b' \\xf0\\x9f', b'\\xa4', b'\\x96']
"""

from __future__ import annotations

import functools
import json
import re
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from .errors import TokenizerError

# A probe that exercises every byte class the vocabularies differ on; used to verify each table.
PROBE_TEXT = (
    "Hello, world! def add(a, b):\n\treturn a + b  # code\n"
    "你好，世界。東京タワー 🤖🎉 👨‍👩‍👧 naïve café e\u0301 مرحبا עברית 1234567 3.14159 "
    "  spaces\n\n\nend"
)

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_level_translation() -> dict[int, int]:
    """GPT-2's byte alphabet, inverted: maps each stand-in character's code point to its byte value."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    stand_ins, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            stand_ins[byte] = byte
        else:
            stand_ins[byte] = 256 + extra
            extra += 1
    return {code_point: byte for byte, code_point in stand_ins.items()}


class PerObject:
    """One value per live object (held weakly), built once under a lock: the per-tokenizer tables the hooks
    share across samples and threads.

    Example:
        >>> tables = PerObject()
        >>> key = type("Key", (), {})()
        >>> tables.get(key, lambda: [1]) is tables.get(key, lambda: [2])
        True
    """

    def __init__(self) -> None:
        self._values: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def get(self, key: Any, build: Any) -> Any:
        """The value for ``key``, calling ``build()`` the first time."""
        with self._lock:
            value = self._values.get(key)
            if value is None:
                value = self._values[key] = build()
            return value


@dataclass(frozen=True, eq=False)
class TokenBytes:
    """Per-token byte table of one tokenizer.

    Attributes:
        blob: every token's bytes, concatenated (uint8).
        offsets: int64 ``[vocab + 1]``; token ``i`` spells ``blob[offsets[i]:offsets[i + 1]]``.
        special: bool ``[vocab]``; True for control tokens, which spell no bytes.
        scheme: ``"byte_level"`` or ``"sentencepiece"``: how pieces were turned into bytes.
        adds_dummy_prefix: True if encoding ``"a"`` yields a leading space token or piece (SentencePiece
            tokenizers with ``add_dummy_prefix``); callers that encode a continuation must account for it.
        name: the tokenizer's ``name_or_path``, for messages.
    """

    blob: np.ndarray
    offsets: np.ndarray
    special: np.ndarray
    scheme: str
    adds_dummy_prefix: bool
    name: str

    @property
    def vocab_size(self) -> int:
        return len(self.special)

    @property
    def lengths(self) -> np.ndarray:
        """int64 ``[vocab]``: bytes per token (0 for special tokens). Computed once; do not modify it."""
        return self._lengths

    @functools.cached_property
    def _lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @functools.cached_property
    def _pieces(self) -> tuple[bytes, ...]:
        """Every token's bytes as a Python ``bytes`` object, for joining a few tokens without numpy calls."""
        blob, offsets = self.blob.tobytes(), self.offsets.tolist()
        return tuple(blob[offsets[i]:offsets[i + 1]] for i in range(self.vocab_size))

    def check_ids(self, ids: np.ndarray, what: str = "token ids") -> np.ndarray:
        """Return ``ids`` as int64, raising a clear error for ids outside the vocabulary."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)][:5].tolist()
            raise TokenizerError(
                f"{what} {bad} are outside the vocabulary of {self.name} (size {self.vocab_size}); "
                "is this the tokenizer the ids came from?"
            )
        return ids

    def lengths_of(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """int64 array: bytes spelled by each id (0 for special tokens)."""
        return self._lengths[self.check_ids(ids)]

    def bytes_of(self, ids: Sequence[int] | np.ndarray) -> bytes:
        """The bytes the ids spell in running text (special tokens spell nothing)."""
        if len(ids) <= _JOIN_BELOW:
            return self._join(ids)
        ids = self.check_ids(ids)
        starts = self.offsets[ids]
        lengths = self._lengths[ids]
        total = int(lengths.sum())
        if total == 0:
            return b""
        # Gather every token's slice at once: position k of the output reads blob[start_of_its_token + rank].
        out_starts = np.cumsum(lengths) - lengths
        index = np.repeat(starts - out_starts, lengths) + np.arange(total)
        return self.blob[index].tobytes()

    def _join(self, ids: Sequence[int] | np.ndarray) -> bytes:
        """:meth:`bytes_of` for a few ids: a join of Python ``bytes`` (one numpy gather costs more)."""
        ids = ids.tolist() if isinstance(ids, np.ndarray) else [int(i) for i in ids]
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            self.check_ids(np.asarray(ids, dtype=np.int64))  # raises with the message
        return b"".join(map(self._pieces.__getitem__, ids))


#: :meth:`TokenBytes.bytes_of` joins Python ``bytes`` up to this many ids (measured on Qwen3's table: 6x faster
#: than the numpy gather at 33 ids, 1.5x at 256, even at about 1k).
_JOIN_BELOW = 256


def _decoder_scheme(tokenizer) -> str:
    """Which byte convention the tokenizer's decoder uses: ``byte_level`` or ``sentencepiece``."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
        kinds = {d.get("type") for d in decoder.get("decoders", [decoder])}
        if "ByteLevel" in kinds:
            return "byte_level"
        if kinds & {"Metaspace", "ByteFallback", "Replace"}:
            return "sentencepiece"
        if kinds & {"WordPiece", "BPEDecoder", "CTC"}:
            raise TokenizerError(
                f"tokenizer {tokenizer.name_or_path!r} uses a {sorted(kinds)} decoder, which does not spell "
                "running text token by token; slime-xvocab supports byte-level BPE and SentencePiece-style "
                "causal-LM tokenizers"
            )
    # No fast backend (or an empty decoder): infer from the pieces themselves.
    pieces = tokenizer.convert_ids_to_tokens(list(range(min(len(tokenizer), 5000))))
    meta = sum("▁" in p for p in pieces if p)
    byte_level = sum("Ġ" in p or "Ċ" in p for p in pieces if p)
    return "byte_level" if byte_level >= meta else "sentencepiece"


def _piece_bytes(piece: str, scheme: str, translation: dict[int, int]) -> bytes:
    if scheme == "byte_level":
        mapped = [translation.get(ord(ch)) for ch in piece]
        if None in mapped:  # added tokens keep their literal text (as the ByteLevel decoder does)
            return piece.encode("utf-8")
        return bytes(mapped)
    match = _BYTE_FALLBACK.match(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    return piece.replace("▁", " ").encode("utf-8")


def _special_ids(tokenizer) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(token_id))
    return ids


def _build(tokenizer) -> TokenBytes:
    scheme = _decoder_scheme(tokenizer)
    vocab_size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    special = np.zeros(vocab_size, dtype=bool)
    special[[i for i in _special_ids(tokenizer) if 0 <= i < vocab_size]] = True
    translation = _byte_level_translation()
    chunks = [
        b"" if (special[i] or piece is None) else _piece_bytes(piece, scheme, translation)
        for i, piece in enumerate(pieces)
    ]
    lengths = np.fromiter(map(len, chunks), dtype=np.int64, count=vocab_size)
    offsets = np.zeros(vocab_size + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    blob = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    probe = tokenizer.encode("a", add_special_tokens=False)
    name = str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)
    table = TokenBytes(blob, offsets, special, scheme, False, name)
    dummy = table.bytes_of(probe) == b" a"
    table = TokenBytes(blob, offsets, special, scheme, dummy, name)
    _verify(tokenizer, table)
    return table


def _verify(tokenizer, table: TokenBytes) -> None:
    """Check the table against the tokenizer's own encode/decode on :data:`PROBE_TEXT`."""
    ids = tokenizer.encode(PROBE_TEXT, add_special_tokens=False)
    spelled = table.bytes_of(ids)
    decoded = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    got = spelled.decode("utf-8", errors="replace")
    if table.adds_dummy_prefix and got.startswith(" ") and not decoded.startswith(" "):
        got = got[1:]  # SentencePiece decoders strip the dummy prefix space; the table keeps it
    if got != decoded:
        at = next((k for k, (a, b) in enumerate(zip(got, decoded)) if a != b), min(len(got), len(decoded)))
        raise TokenizerError(
            f"token byte table for {table.name!r} ({table.scheme}) disagrees with tokenizer.decode at "
            f"character {at}: table {got[max(0, at - 10):at + 10]!r} vs decode {decoded[max(0, at - 10):at + 10]!r}. "
            "This tokenizer's decoder is not supported; please report it with the tokenizer files."
        )


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CACHE_BY_ID: dict[int, TokenBytes] = {}


def token_bytes(tokenizer) -> TokenBytes:
    """The byte table of ``tokenizer``, built once and cached for the tokenizer's lifetime.

    Args:
        tokenizer: a Hugging Face tokenizer (fast/``TokenizersBackend`` preferred; GGUF- and
            tiktoken-converted tokenizers load as fast tokenizers).

    Returns:
        The verified :class:`TokenBytes` table. Building it costs ~0.2-1 s for a 150k-262k vocabulary.

    Raises:
        TokenizerError: the tokenizer's decoding rules are not supported or fail verification.
    """
    try:
        cached = _CACHE.get(tokenizer)
    except TypeError:  # not weak-referenceable
        cached = _CACHE_BY_ID.get(id(tokenizer))
    if cached is not None and cached.vocab_size == len(tokenizer):
        return cached
    table = _build(tokenizer)
    try:
        _CACHE[tokenizer] = table
    except TypeError:
        _CACHE_BY_ID[id(tokenizer)] = table
    return table


_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_BY_ID: dict[int, threading.RLock] = {}
_LOCKS_GUARD = threading.Lock()


def tokenizer_lock(tokenizer) -> threading.RLock:
    """The (re-entrant) lock that serialises encoding calls on one tokenizer object.

    A transformers (v5) fast tokenizer implements ``split_special_tokens=`` by flipping a flag on the
    shared Rust tokenizer around the encode, so two threads that encode with different settings (a prompt
    parses special tokens, :func:`~slime_xvocab.alignment.encode_bytes` does not) can corrupt each other's
    ids. Every encode in slime-xvocab that may run in a worker thread holds this lock.
    """
    with _LOCKS_GUARD:
        try:
            lock = _LOCKS.get(tokenizer)
            if lock is None:
                lock = _LOCKS[tokenizer] = threading.RLock()
        except TypeError:  # not weak-referenceable
            lock = _LOCKS_BY_ID.setdefault(id(tokenizer), threading.RLock())
        return lock
