"""``slime-xvocab check``: preflight a teacher/student pair on your own data, before a GPU job starts.

It reads conversations, takes each one's final assistant turn as the response the student would have
generated (the student's encoding of the text plus the student's end-of-turn token), builds the teacher's
view of it exactly as training will (:class:`~slime_xvocab.teacher_view.TeacherViewBuilder`), and reports
how well the two tokenizations align. With ``--teacher-url`` it also probes the live teacher.

::

    slime-xvocab check --student qwen3 --teacher /models/Llama-3.1-70B-Instruct --data train.jsonl
    slime-xvocab check --student ... --teacher ... --data rows.parquet --messages-key metadata.messages --json

Definitions (all token counts are response tokens, the student's end-of-turn token included):

* ``one_to_one_fraction`` = sum over samples of student positions in a 1:1 chunk / sum of student tokens.
* ``covered_fraction`` = sum of student positions in any chunk / sum of student tokens.
* ``eot_mapped_fraction`` = samples whose end-of-turn token was paired with the teacher's / samples.
* ``mean_chunk_width``, ``chunk_width_p99``, ``max_chunk_width``: over every chunk of every sample; a
  chunk's width is its longer side in tokens (1:1 is 1).
* A **byte-mismatch sample** is one the teacher cannot score as the student's bytes, even through its
  offset mapping: (a) some student token that spells bytes has no teacher chunk for a reason other than
  the teacher's context limit (``no_teacher_tokens``, ``invalid_utf8``, ``byte_mismatch``, or an
  ``uncovered_tail`` when nothing was truncated); or (b) ``text_changed``: the teacher's response tokens
  spell a text that is not the student's even after NFKC normalisation of both (a normaliser that drops,
  collapses or rewrites characters; the alignment absorbs such gaps into neighbouring chunks, so only
  this comparison sees them); or (c) ``view_failed``: the teacher view could not be built. A teacher that
  only re-composes characters (NFC/NFKC) is counted in ``normalized_samples`` instead. Unpaired control
  tokens (``special``) and positions past the context limit (``teacher_context``) are reported
  separately and are not mismatches.

Exit status: 0 every sample aligns; 1 some sample is a byte mismatch (unless ``--allow-mismatch``) or the
teacher probe failed; 2 bad usage or unreadable input.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .alignment import Unaligned, describe_mismatch
from .config import API_KEY_ENV, OLD_API_KEY_ENV
from .errors import ConfigError, SampleError, TeacherBadResponse, TeacherError, XVocabError
from .token_bytes import TokenBytes, token_bytes
from .urls import redact_url

logger = logging.getLogger("slime_xvocab.check")

#: Unaligned reasons that always make a sample a byte mismatch.
MISMATCH_REASONS = frozenset(
    {Unaligned.INVALID_UTF8, Unaligned.NO_TEACHER_TOKENS, Unaligned.BYTE_MISMATCH, Unaligned.TEACHER_FAILED}
)
#: Below this covered fraction a warning is raised.
LOW_COVERAGE = 0.99
#: In exact mode, below this 1:1 fraction a warning suggests chunk mode.
LOW_ONE_TO_ONE = 0.9
#: How many byte-mismatch examples the report lists.
MAX_EXAMPLES = 5
#: Characters of each side shown in the preview (prompt tail, response head).
PREVIEW_CHARS = 700


class InputError(ConfigError):
    """Bad usage or unreadable input (exit status 2)."""


# --------------------------------------------------------------------------------------------------
# Reading conversations


@dataclass(frozen=True)
class Conversation:
    """One row of the data file, split into prompt messages and the response text.

    Attributes:
        row: 1-based row number among the file's records.
        where: how messages name the row (``"row 3 (line 4)"`` for jsonl, ``"row 3"`` for parquet).
        prompt: the messages before the response (``[{"role", "content", ...}]``).
        response: the response text (the final assistant turn's content, or ``--response-key``).
        tools: the row's tool definitions, if any (passed to both chat templates).
    """

    row: int
    where: str
    prompt: list[dict]
    response: str
    tools: list | None = None


def iter_records(path: str | os.PathLike) -> Iterator[tuple[int, str, dict]]:
    """Yield ``(row, where, record)`` from a jsonl or parquet file, lazily.

    Blank jsonl lines are skipped. Raises :class:`InputError` naming the line for a line that is not
    UTF-8, not JSON or not a JSON object.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"data file {str(p)!r} not found; pass an existing .jsonl or .parquet file to --data")
    if p.is_dir():
        raise InputError(f"--data {str(p)!r} is a directory; pass a .jsonl or .parquet file")
    if p.suffix == ".parquet":
        yield from _iter_parquet(p)
        return
    try:
        f = open(p, "rb")
    except OSError as e:
        raise InputError(f"cannot read data file {str(p)!r}: {e.strerror}") from e
    row = 0
    with f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(
                    f"{p.name}: line {line_no} is not valid UTF-8 (byte {e.start}: "
                    f"{raw[e.start : e.start + 4]!r}); re-encode the file as UTF-8 "
                    "(e.g. iconv -f latin1 -t utf-8)"
                ) from None
            if not line.strip():
                continue
            if row == 0 and line.startswith("\ufeff"):
                line = line[1:]
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(
                    f"{p.name}: line {line_no} is not JSON ({e.msg} at column {e.colno}); "
                    "--data expects one JSON object per line (jsonl) or a .parquet file"
                ) from None
            row += 1
            if not isinstance(record, dict):
                raise InputError(
                    f"{p.name}: line {line_no} is a JSON {type(record).__name__}, not an object; "
                    'each line must be an object such as {"messages": [...]}'
                )
            yield row, f"row {row} (line {line_no})", record


def _iter_parquet(p: Path) -> Iterator[tuple[int, str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise InputError("reading parquet needs pyarrow (pip install pyarrow), or convert the file to jsonl") from e
    try:
        reader = pq.ParquetFile(p)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several unrelated types for a bad file
        raise InputError(f"cannot read {p.name} as parquet: {e}") from None
    row = 0
    for batch in reader.iter_batches(batch_size=256):
        for record in batch.to_pylist():
            row += 1
            yield row, f"row {row}", record


def get_path(record: dict, key: str) -> Any:
    """Look ``key`` up in ``record``; a dotted key walks nested objects (``metadata.messages``).

    A literal key containing dots wins over the nested path. Raises ``KeyError`` naming the missing part.
    """
    if key in record:
        return record[key]
    node: Any = record
    for i, part in enumerate(key.split(".")):
        if isinstance(node, str) and i:  # a nested JSON string (common in parquet metadata columns)
            with contextlib.suppress(ValueError):
                node = json.loads(node)
        if not isinstance(node, dict) or part not in node:
            raise KeyError(part)
        node = node[part]
    return node


def _content_text(content: Any) -> str | None:
    """A message's text: a string, or the text parts of an OpenAI-style content list."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [c.get("text") for c in content if isinstance(c, dict) and c.get("type", "text") == "text"]
        return "".join(p for p in parts if isinstance(p, str))
    return None


def _key_error(where: str, key: str, flag: str, record: dict) -> InputError:
    keys = ", ".join(sorted(map(str, record))[:12]) or "none"
    return InputError(f"{where}: missing key {key!r} (the row has: {keys}); set {flag} to the field that holds it")


def conversation_from_record(
    row: int,
    where: str,
    record: dict,
    *,
    messages_key: str = "messages",
    response_key: str | None = None,
    tools_key: str = "tools",
) -> Conversation:
    """Split one record into prompt messages and response text.

    Without ``response_key`` the response is the content of the last ``assistant`` message and the prompt
    is every message before it (later messages are ignored). With ``response_key`` the whole message list
    is the prompt and the response is that field's string.

    Raises:
        InputError: missing key, messages that are not a list of ``{"role": ...}`` objects, no assistant
            turn, or a response that is not a string. The message names the row and the fix.
    """
    try:
        messages = get_path(record, messages_key)
    except KeyError:
        raise _key_error(where, messages_key, "--messages-key", record) from None
    if isinstance(messages, str):
        try:
            messages = json.loads(messages)
        except ValueError:
            raise InputError(
                f"{where}: {messages_key!r} is a plain string, not a list of messages; point "
                '--messages-key at a list of {"role": ..., "content": ...} objects'
            ) from None
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise InputError(
            f'{where}: {messages_key!r} must be a list of {{"role": ..., "content": ...}} objects, got '
            f"{type(messages).__name__}"
        )
    tools = record.get(tools_key) if tools_key else None
    if isinstance(tools, str):
        with contextlib.suppress(ValueError):
            tools = json.loads(tools)
    tools = tools if isinstance(tools, list) and tools else None
    if response_key is not None:
        try:
            response = get_path(record, response_key)
        except KeyError:
            raise _key_error(where, response_key, "--response-key", record) from None
        if not isinstance(response, str):
            raise InputError(f"{where}: {response_key!r} must be a string, got {type(response).__name__}")
        return Conversation(row, where, list(messages), response, tools)
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None:
        raise InputError(
            f"{where}: no assistant turn in {messages_key!r} (roles: {[m.get('role') for m in messages]}); "
            "the final assistant turn is the response to check, or pass --response-key for responses stored "
            "in another field"
        )
    text = _content_text(messages[last].get("content"))
    if text is None:
        raise InputError(f"{where}: the final assistant turn's content is not text")
    return Conversation(row, where, list(messages[:last]), text, tools)


def read_conversations(path: str | os.PathLike, n: int, **keys: Any) -> tuple[list[Conversation], list[str]]:
    """The first ``n`` usable conversations of a file, and notes about rows that were skipped.

    A row whose response is empty (e.g. a final turn that only calls a tool) is skipped with a note;
    every other problem raises :class:`InputError`.
    """
    out: list[Conversation] = []
    skipped: list[str] = []
    for row, where, record in iter_records(path):
        conv = conversation_from_record(row, where, record, **keys)
        if not conv.response:
            skipped.append(f"{where}: empty response")
            continue
        out.append(conv)
        if len(out) >= n:
            break
    if not out:
        raise InputError(f"no conversation with a non-empty response in {str(path)!r}")
    return out, skipped


# --------------------------------------------------------------------------------------------------
# Tokenizers


@dataclass(frozen=True)
class TokenizerInfo:
    """A loaded tokenizer and what the report says about it."""

    spec: str
    tokenizer: Any
    table: TokenBytes
    family: str
    eot_id: int | None

    def describe(self) -> dict[str, Any]:
        tok = self.tokenizer
        return {
            "spec": self.spec,
            "family": self.family,
            "class": type(tok).__name__,
            "vocab_size": self.table.vocab_size,
            "byte_scheme": self.table.scheme,
            "adds_dummy_prefix": bool(self.table.adds_dummy_prefix),
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "end_of_turn": _token_str(tok, self.eot_id),
            "end_of_turn_id": self.eot_id,
            "has_chat_template": bool(getattr(tok, "chat_template", None)),
        }


def _token_str(tok: Any, token_id: int | None) -> str | None:
    return None if token_id is None else str(tok.convert_ids_to_tokens(int(token_id)))


def load_tokenizer_spec(spec: str, *, trust_remote_code: bool = False) -> tuple[Any, str]:
    """Load a tokenizer from a model/tokenizer directory or an :mod:`slime_xvocab.assets` family name.

    Returns:
        ``(tokenizer, family)``: the family is the asset name, or the directory's ``config.json``
        ``model_type`` (else the tokenizer class name).
    """
    from . import assets

    path = Path(spec).expanduser()
    if path.is_dir():
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad directory
            raise InputError(f"cannot load a tokenizer from {str(path)!r}: {type(e).__name__}: {e}") from None
        family = type(tok).__name__
        with contextlib.suppress(OSError, ValueError):
            family = json.loads((path / "config.json").read_text()).get("model_type") or family
        return tok, family
    if spec in assets.TOKENIZERS:
        return assets.load_tokenizer(spec), spec
    if not _looks_like_hub_id(spec):
        raise InputError(
            f"{spec!r} is neither a directory nor a known tokenizer family nor a hub id (org/name); pass a local "
            "model or tokenizer directory (loadable with AutoTokenizer.from_pretrained), a Hugging Face hub id, "
            f"or one of: {', '.join(assets.TOKENIZERS)}"
        )
    from transformers import AutoTokenizer

    try:  # a hub id, as the hooks accept for xvocab_*_tokenizer
        tok = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad spec
        first = str(e).splitlines()[0] if str(e) else ""
        raise InputError(
            f"cannot load a tokenizer from the hub id {spec!r}: {type(e).__name__}: {first}. Pass a local model "
            f"or tokenizer directory, a bundled family ({', '.join(assets.TOKENIZERS)}), or a hub id reachable "
            "from here."
        ) from None
    return tok, type(tok).__name__


def _looks_like_hub_id(spec: str) -> bool:
    """``org/name`` (what the hooks would hand to ``from_pretrained`` as a hub id), not a path."""
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "~")) and " " not in spec


def env_api_key(environ: Any = None) -> str | None:
    """The teacher API key from ``XVOCAB_API_KEY`` (what the hooks read), else from the deprecated
    ``SLIME_XVOCAB_TEACHER_API_KEY`` with a warning on stderr."""
    environ = os.environ if environ is None else environ
    if environ.get(API_KEY_ENV):
        return environ[API_KEY_ENV]
    if environ.get(OLD_API_KEY_ENV):
        print(f"warning: {OLD_API_KEY_ENV} is deprecated: set {API_KEY_ENV} (read by the hooks too)", file=sys.stderr)
        return environ[OLD_API_KEY_ENV]
    return None


def end_of_turn_id(tok: Any, table: TokenBytes, template_kwargs: dict | None = None) -> int | None:
    """The control token that closes an assistant turn in ``tok``'s chat template (else its EOS).

    ``<|im_end|>`` for ChatML (Qwen), ``<|eot_id|>`` for Llama-3, ``<end_of_turn>`` for Gemma; see
    :func:`slime_xvocab.teacher_view.template_end_of_turn`.
    """
    from .teacher_view import template_end_of_turn

    found = template_end_of_turn(tok, table, template_kwargs)
    if found:
        return int(found[0])
    eos = tok.eos_token_id
    return int(eos) if isinstance(eos, int) else None


def render_prompt_ids(tok: Any, messages: list[dict], tools: list | None, template_kwargs: dict) -> list[int]:
    """The student's prompt ids as slime builds them (``--apply-chat-template``).

    ``apply_chat_template(..., tokenize=False, add_generation_prompt=True)`` then ``encode`` without
    special tokens. A tokenizer without a chat template joins the message contents with blank lines.
    """
    if getattr(tok, "chat_template", None):
        text = tok.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=True, **template_kwargs
        )
    else:
        text = "\n\n".join(_content_text(m.get("content")) or "" for m in messages)
    return list(tok.encode(text, add_special_tokens=False))


def response_ids(tok: Any, text: str, eot_id: int | None) -> list[int]:
    """The student's response ids: ``text`` encoded as plain text, then the end-of-turn token.

    Text that looks like a control token (``<|im_end|>`` in prose) stays text (``split_special_tokens``),
    as it does for the teacher.
    """
    ids = list(tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])
    return ids + ([eot_id] if eot_id is not None else [])


def ignores_generation_prompt(tok: Any, template_kwargs: dict) -> bool:
    """True if the chat template renders the same text with and without ``add_generation_prompt``."""
    if not getattr(tok, "chat_template", None):
        return False
    msgs = [{"role": "user", "content": "hi"}]
    try:
        with_gp = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **template_kwargs)
        without = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False, **template_kwargs)
    except Exception:  # noqa: BLE001 - a template that cannot render a user turn is reported elsewhere
        return False
    return with_gp == without


# --------------------------------------------------------------------------------------------------
# Per-sample analysis


@dataclass
class SampleResult:
    """Alignment facts of one sample (student response tokens include the end-of-turn token)."""

    row: int
    where: str
    student_tokens: int
    teacher_tokens: int = 0
    teacher_prompt_tokens: int = 0
    one_to_one_tokens: int = 0
    covered_tokens: int = 0
    chunk_widths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    unaligned_by_reason: dict[str, int] = field(default_factory=dict)
    eot_mapped: bool = False
    truncated_tokens: int = 0
    full_sequence_tokens: int = 0
    exact_bytes: bool = True
    mismatch: str | None = None
    mismatch_reasons: list[str] = field(default_factory=list)
    mismatch_cause: str | None = None
    view: Any = None


def _equivalent_text(student: bytes, teacher: bytes, truncated: bool) -> bool:
    """True if the teacher's text is the student's up to Unicode compatibility (NFKC) normalisation.

    For a truncated teacher sequence it must be a prefix (its last character may be cut).
    """
    s = unicodedata.normalize("NFKC", student.decode("utf-8", "replace"))
    t = unicodedata.normalize("NFKC", teacher.decode("utf-8", "replace"))
    if not truncated:
        return s == t
    return s.startswith(t[:-1])


def analyse_sample(
    builder: Any,
    conv: Conversation,
    ids: list[int],
    student: TokenBytes,
    teacher: TokenBytes,
    *,
    keep_view: bool = False,
    unlimited: Any = None,
) -> SampleResult:
    """Build the teacher view of one sample and measure its alignment.

    Args:
        builder: the :class:`~slime_xvocab.teacher_view.TeacherViewBuilder` training will use.
        conv: the conversation; ``ids`` the student's response ids (end of turn included).
        student, teacher: the two token byte tables.
        keep_view: keep the :class:`TeacherView` on the result (preview, teacher probe).
        unlimited: a builder without ``max_teacher_tokens``, used to count the tokens of a sample whose
            prompt alone fills the teacher's context (a context overflow, not a byte mismatch).

    Never raises for a sample-level problem: a view that cannot be built becomes a byte-mismatch result
    that carries the error message.
    """
    res = SampleResult(conv.row, conv.where, student_tokens=len(ids))
    limit = getattr(builder, "max_teacher_tokens", None)
    try:
        if limit is not None and unlimited is not None:
            prompt_len = len(builder.teacher_prompt_ids(conv.prompt, tools=conv.tools, sample_id=conv.where))
            if prompt_len >= limit:  # the whole response is past the context limit
                full = unlimited.build(conv.prompt, ids, tools=conv.tools, sample_id=conv.where)
                res.teacher_prompt_tokens = prompt_len
                res.truncated_tokens = len(full.input_ids) - full.response_start
                res.full_sequence_tokens = len(full.input_ids)
                res.unaligned_by_reason = {"teacher_context": len(ids)}
                return res
        view = builder.build(conv.prompt, ids, tools=conv.tools, sample_id=conv.where)
    except (XVocabError, ValueError, TypeError, KeyError) as e:
        res.mismatch = f"{type(e).__name__}: {e}"
        res.mismatch_reasons = ["view_failed"]
        res.unaligned_by_reason = {"view_failed": len(ids)}
        return res
    al = view.alignment
    stats = al.stats()
    s_sizes, t_sizes = al.chunk_sizes()
    res.teacher_prompt_tokens = int(view.response_start)
    res.teacher_tokens = len(view.input_ids) - int(view.response_start)
    res.one_to_one_tokens = stats.one_to_one_tokens
    res.covered_tokens = stats.covered_tokens
    res.chunk_widths = np.maximum(s_sizes, t_sizes)
    res.unaligned_by_reason = dict(stats.unaligned_by_reason)
    res.eot_mapped = bool(view.eot_mapped)
    res.truncated_tokens = int(view.teacher_truncated_tokens)
    res.full_sequence_tokens = len(view.input_ids)
    if res.truncated_tokens and unlimited is not None:  # the length the teacher would need
        with contextlib.suppress(XVocabError, ValueError):
            full = unlimited.build(conv.prompt, ids, tools=conv.tools, sample_id=conv.where)
            res.full_sequence_tokens = len(full.input_ids)
    res.exact_bytes = bool(view.exact_bytes)
    res.view = view if keep_view else None

    reasons = al.reason
    text_positions = student.lengths_of(ids) > 0
    bad = np.isin(reasons, [int(r) for r in MISMATCH_REASONS]) & text_positions
    if res.truncated_tokens == 0:  # an uncovered tail without truncation is not the context limit
        bad |= (reasons == Unaligned.TEACHER_CONTEXT) & text_positions
    names = {Unaligned(int(r)).name.lower() for r in reasons[bad]}
    s_bytes = student.bytes_of(ids)
    t_bytes = teacher.bytes_of(np.asarray(view.input_ids[view.response_start :], dtype=np.int64))
    if not res.exact_bytes and not _equivalent_text(s_bytes, t_bytes, res.truncated_tokens > 0):
        names.add("text_changed")
    if names:
        res.mismatch_reasons = sorted("uncovered_tail" if n == "teacher_context" else n for n in names)
        where = ""
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            where = f"student token {first} ({student.bytes_of(ids[first : first + 1])!r}) has no teacher chunk; "
        res.mismatch = where + (
            describe_mismatch(s_bytes, t_bytes)
            if s_bytes != t_bytes
            else "the teacher's tokens spell the same bytes, but their offsets miss some student token"
        )
        res.mismatch_cause = mismatch_cause(s_bytes, t_bytes)
    return res


def mismatch_cause(student: bytes, teacher: bytes) -> str:
    """The most specific known reason why the teacher's tokens do not spell the student's bytes (pure).

    Example:
        >>> mismatch_cause("a\u2581b".encode(), b"a b")  # doctest: +ELLIPSIS
        'the teacher tokenizer spells a literal U+2581 (\u2581, the SentencePiece space mark) as a space: ...
    """
    if student == teacher:
        return "the teacher's tokens spell the same bytes, but their offsets miss some student token"
    s_text, t_text = student.decode("utf-8", "replace"), teacher.decode("utf-8", "replace")
    if "\u2581" in s_text and s_text.replace("\u2581", " ") == t_text:
        return (
            "the teacher tokenizer spells a literal U+2581 (\u2581, the SentencePiece space mark) as a space: "
            "text containing it cannot round-trip through that tokenizer; remove U+2581 from the data"
        )
    for form in ("NFC", "NFKC"):
        if unicodedata.normalize(form, s_text) == unicodedata.normalize(form, t_text):
            return f"the teacher tokenizer {form}-normalises text; {form}-normalise the data"
    if "".join(s_text.split()) == "".join(t_text.split()):
        return "the teacher tokenizer changes whitespace (collapses, strips or adds spaces/newlines)"
    if len(teacher) < len(student) and student.startswith(teacher):
        return "the teacher's tokens stop early (a context limit?)"
    return "the teacher's tokens spell different text (see byte_mismatch_examples for where)"


# --------------------------------------------------------------------------------------------------
# Aggregation (pure)


def aggregate(results: Sequence[SampleResult], mode: str = "chunk") -> dict[str, Any]:
    """Token-weighted statistics over all samples; see the module docstring for the definitions."""
    n = len(results)
    s_tok = sum(r.student_tokens for r in results)
    t_tok = sum(r.teacher_tokens for r in results)
    one = sum(r.one_to_one_tokens for r in results)
    cov = sum(r.covered_tokens for r in results)
    widths = np.concatenate([r.chunk_widths for r in results]) if results else np.zeros(0, dtype=np.int64)
    reasons: dict[str, int] = {}
    for r in results:
        for k, v in r.unaligned_by_reason.items():
            reasons[k] = reasons.get(k, 0) + int(v)
    mism = [r for r in results if r.mismatch is not None]
    one_frac = one / s_tok if s_tok else 1.0
    cov_frac = cov / s_tok if s_tok else 1.0
    return {
        "samples": n,
        "student_tokens": s_tok,
        "teacher_tokens": t_tok,
        "teacher_student_token_ratio": t_tok / s_tok if s_tok else 0.0,
        "one_to_one_fraction": one_frac,
        "covered_fraction": cov_frac,
        "signal_fraction": one_frac if mode == "exact" else cov_frac,
        "mean_chunk_width": float(widths.mean()) if len(widths) else 0.0,
        "chunk_width_p99": float(np.percentile(widths, 99)) if len(widths) else 0.0,
        "max_chunk_width": int(widths.max()) if len(widths) else 0,
        "eot_mapped_fraction": sum(r.eot_mapped for r in results) / n if n else 0.0,
        "byte_mismatch_samples": len(mism),
        "byte_mismatch_examples": [
            {
                "row": r.row,
                "where": r.where,
                "reasons": r.mismatch_reasons,
                "cause": r.mismatch_cause,
                "detail": r.mismatch,
            }
            for r in mism[:MAX_EXAMPLES]
        ],
        "normalized_samples": sum(1 for r in results if not r.exact_bytes and r.mismatch is None),
        "context_overflow_samples": sum(1 for r in results if r.truncated_tokens > 0),
        "teacher_truncated_tokens": sum(r.truncated_tokens for r in results),
        "teacher_sequence_tokens_max": max((r.full_sequence_tokens for r in results), default=0),
        "eot_unmapped_samples": sum(
            1 for r in results if not r.eot_mapped and r.truncated_tokens == 0 and r.mismatch is None
        ),
        "unaligned_tokens_by_reason": dict(sorted(reasons.items())),
    }


# --------------------------------------------------------------------------------------------------
# Live teacher probe


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else None


async def teacher_info(
    url: str, *, timeout_s: float, api_key: str | None, ca_bundle: str | None = None
) -> dict[str, Any]:
    """Health, ``/model_info`` and ``/server_info`` of the teacher; failures are counted, never raised."""
    from .teacher_client import TeacherClient

    out: dict[str, Any] = {
        "url": redact_url(url),
        "healthy": False,
        "model_info": None,
        "server_info": None,
        "errors": 0,
        "error_messages": [],
    }
    async with TeacherClient(
        url, timeout_s=timeout_s, max_retries=1, api_key=api_key, ca_bundle=ca_bundle
    ) as client:
        health = await client.health()
        out["healthy"] = bool(health) and all(health.values())
        if not out["healthy"]:
            out["errors"] += 1
            shown = {redact_url(u): ok for u, ok in health.items()}
            out["error_messages"].append(f"health check failed ({client.health_path}): {shown}")
        for key, call in (("model_info", client.model_info), ("server_info", client.server_info)):
            try:
                out[key] = await call()
            except TeacherError as e:
                out["errors"] += 1
                out["error_messages"].append(f"{key}: {e}")
    return out


async def probe_scores(
    url: str,
    items: Sequence[tuple[list[int], int]],
    *,
    timeout_s: float,
    api_key: str | None,
    repeats: int = 2,
    ca_bundle: str | None = None,
) -> dict[str, Any]:
    """Score every item ``repeats`` times, one call at a time.

    Returns:
        ``scored_samples``, ``determinism_max_abs_diff`` (largest difference between two scorings of one
        sample; 0.0 for a deterministic teacher), ``latency_p50_s`` / ``latency_p99_s`` (per call),
        ``mean_teacher_logprob`` (per response token), ``errors`` (failed calls, the client's validation
        of lengths and echoed ids included) and ``bad_responses`` (those that failed validation).
    """
    from .teacher_client import TeacherClient

    latencies: list[float] = []
    diffs: list[float] = []
    firsts: list[np.ndarray] = []
    errors, bad, messages = 0, 0, []
    async with TeacherClient(
        url, timeout_s=timeout_s, max_retries=1, api_key=api_key, ca_bundle=ca_bundle
    ) as client:
        for ids, start in items:
            runs = []
            for _ in range(repeats):
                try:
                    scores = await client.score(ids, start)
                except (TeacherError, SampleError) as e:
                    errors += 1
                    bad += isinstance(e, TeacherBadResponse)
                    messages.append(str(e)[:300])
                    continue
                latencies.append(scores.latency_s)
                runs.append(np.asarray(scores.log_probs, dtype=np.float64))
            if runs:
                firsts.append(runs[0])
            for other in runs[1:]:
                diffs.append(float(np.max(np.abs(other - runs[0]))) if len(other) else 0.0)
    all_lps = np.concatenate(firsts) if firsts else np.zeros(0)
    return {
        "scored_samples": len(firsts),
        "determinism_max_abs_diff": max(diffs) if diffs else None,
        "latency_p50_s": _percentile(latencies, 50),
        "latency_p99_s": _percentile(latencies, 99),
        "mean_teacher_logprob": float(all_lps.mean()) if len(all_lps) else None,
        "errors": errors,
        "bad_responses": bad,
        "error_messages": messages[:MAX_EXAMPLES],
    }


# --------------------------------------------------------------------------------------------------
# Warnings


def collect_warnings(
    report: dict[str, Any],
    *,
    same_tokenizer: bool,
    student: TokenizerInfo,
    teacher: TokenizerInfo,
    student_no_gp: bool,
    teacher_no_gp: bool,
    doubled_bos: bool,
    rollout_temperature: float | None,
    mode: str,
    skipped: Sequence[str],
) -> list[str]:
    """Human-readable warnings, each naming the problem and the fix."""
    w: list[str] = []
    if same_tokenizer:
        w.append(
            "student and teacher share a tokenizer: plain slime OPD (--use-opd with "
            "slime.rollout.on_policy_distillation hooks) suffices; slime-xvocab adds nothing here"
        )
    for info, role in ((student, "student"), (teacher, "teacher")):
        if not info.describe()["has_chat_template"]:
            w.append(
                f"the {role} tokenizer ({info.spec}) has no chat template; the {role} prompt is plain "
                "text. Use a tokenizer directory whose tokenizer_config.json carries the chat template"
            )
    if student_no_gp:
        w.append(
            "the student's chat template ignores add_generation_prompt: rollouts start without an "
            "assistant header. Fix the template or use an instruct tokenizer"
        )
    if teacher_no_gp:
        w.append(
            "the teacher's chat template ignores add_generation_prompt: the teacher scores the response "
            "without an assistant header before it. Fix the teacher's template"
        )
    if doubled_bos:
        w.append(
            "the teacher's input starts with BOS twice (the template writes BOS and the encoder adds "
            "another); encode the rendered prompt with add_special_tokens=False"
        )
    if rollout_temperature is not None and abs(rollout_temperature - 1.0) > 1e-9:
        w.append(
            f"--rollout-temperature {rollout_temperature:g}: teacher log-probs are temperature-1 values, so "
            "the OPD signal compares distributions at different temperatures; roll out at temperature 1"
        )
    n = report["samples"]
    if report["byte_mismatch_samples"]:
        first = report["byte_mismatch_examples"][0] if report["byte_mismatch_examples"] else {}
        causes = sorted({str(e.get("cause")) for e in report["byte_mismatch_examples"] if e.get("cause")})
        headline = "; ".join(causes) or "see byte_mismatch_examples"
        w.append(
            f"{report['byte_mismatch_samples']}/{n} samples have bytes the teacher cannot reproduce: {headline} "
            f"(first: {first.get('where', '?')}). Their tokens get no teacher signal; details in "
            "byte_mismatch_examples"
        )
    if report["eot_unmapped_samples"] and not report.get("end_of_turn", {}).get("unscored_by_choice"):
        w.append(
            f"the student's end-of-turn token {student.describe()['end_of_turn']!r} was not paired with a "
            f"teacher end-of-turn token in {report['eot_unmapped_samples']}/{n} samples (context overflows "
            "aside), so the teacher never scores stopping there. Set the teacher's end-of-turn token "
            "(--end-of-turn, xvocab end_of_turn)"
        )
    if report["covered_fraction"] < LOW_COVERAGE:
        why = ", ".join(f"{k} {v}" for k, v in report["unaligned_tokens_by_reason"].items())
        w.append(
            f"only {report['covered_fraction']:.1%} of student tokens receive a teacher signal (unaligned "
            f"student tokens: {why})"
        )
    if mode == "exact" and report["one_to_one_fraction"] < LOW_ONE_TO_ONE:
        w.append(
            f"exact mode gives a teacher signal to only the {report['one_to_one_fraction']:.1%} of tokens in "
            "1:1 chunks; use chunk mode (xvocab_mode: chunk) to pass on every chunk's log-mass"
        )
    if report["context_overflow_samples"]:
        w.append(
            f"{report['context_overflow_samples']}/{n} samples exceed the teacher's context limit "
            f"({report['max_teacher_tokens']} tokens; longest sequence "
            f"{report['teacher_sequence_tokens_max']}); their tails get no teacher signal. Raise the "
            "teacher's --context-length or cap the response length"
        )
    if skipped:
        w.append(
            f"{len(skipped)} rows were skipped (e.g. {skipped[0]}); a final turn that only calls a tool "
            "has no response text to check"
        )
    t = report.get("teacher")
    if t:
        if t.get("errors"):
            w.append(
                f"the teacher probe saw {t['errors']} errors (first: {t['error_messages'][:1]}); fix the "
                "teacher server before training"
            )
        d = t.get("determinism_max_abs_diff")
        if d is not None and d > 1e-3:
            w.append(
                f"scoring the same sample twice differed by up to {d:.3g} nats; the teacher is not "
                "deterministic (batch-size dependent kernels?); consider --enable-deterministic-inference"
            )
        vocab = (t.get("server_info") or {}).get("vocab_size")
        if isinstance(vocab, int) and vocab < teacher.table.vocab_size:
            w.append(
                f"the teacher tokenizer has {teacher.table.vocab_size} tokens but the served model only "
                f"{vocab}; --teacher probably names a different tokenizer than the served model's"
            )
    return w


# --------------------------------------------------------------------------------------------------
# Rendering


def token_segments(tok: Any, table: TokenBytes, ids: Sequence[int], response_start: int) -> list[tuple[str, str]]:
    """Split ids into ``(text, kind)`` runs; kind is ``prompt``/``response`` plus ``_special`` for control
    tokens, which are shown as ``⟦<token>⟧``."""
    out: list[tuple[str, str]] = []
    arr = np.asarray(ids, dtype=np.int64)
    k = 0
    while k < len(arr):
        part = "response" if k >= response_start else "prompt"
        if table.special[arr[k]]:
            out.append((f"⟦{tok.convert_ids_to_tokens(int(arr[k]))}⟧", part + "_special"))
            k += 1
            continue
        j = k
        while j < len(arr) and not table.special[arr[j]] and (j >= response_start) == (k >= response_start):
            j += 1
        out.append((table.bytes_of(arr[k:j]).decode("utf-8", "replace"), part))
        k = j
    return out


def _clip_segments(segments: list[tuple[str, str]], limit: int) -> list[tuple[str, str]]:
    """Keep the last ``limit`` characters of the prompt and the first ``limit`` of the response."""
    prompt = [s for s in segments if s[1].startswith("prompt")]
    resp = [s for s in segments if s[1].startswith("response")]

    def clip(segs: list[tuple[str, str]], from_end: bool) -> list[tuple[str, str]]:
        kept, used = [], 0
        for text, kind in reversed(segs) if from_end else segs:
            if used >= limit:
                kept.append(("…", "prompt" if from_end else "response"))
                break
            room = limit - used
            piece = text if len(text) <= room else (text[-room:] if from_end else text[:room])
            kept.append((piece, kind))
            used += len(piece)
        return list(reversed(kept)) if from_end else kept

    return clip(prompt, True) + clip(resp, False)


def segments_text(segments: list[tuple[str, str]]) -> str:
    """Plain text of a rendering, with ``▶`` where the response starts."""
    out, started = [], False
    for text, kind in segments:
        if kind.startswith("response") and not started:
            out.append("▶")
            started = True
        out.append(text)
    return "".join(out)


def print_report(report: dict[str, Any], segments: dict[str, list[tuple[str, str]]], console: Any) -> None:
    """Print the human report with rich tables."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    s, t = report["tokenizers"]["student"], report["tokenizers"]["teacher"]
    tt = Table(title="Tokenizers", box=box.SIMPLE_HEAVY, title_justify="left")
    tt.add_column("")
    tt.add_column("student")
    tt.add_column("teacher")
    for label, key in (
        ("spec", "spec"),
        ("family", "family"),
        ("class", "class"),
        ("vocab size", "vocab_size"),
        ("byte scheme", "byte_scheme"),
        ("dummy prefix", "adds_dummy_prefix"),
        ("BOS", "bos_token"),
        ("end of turn", "end_of_turn"),
        ("chat template", "has_chat_template"),
    ):
        tt.add_row(label, str(s[key]), str(t[key]))
    console.print(tt)

    styles = {
        "prompt": "dim",
        "prompt_special": "bold magenta",
        "response": "green",
        "response_special": "bold magenta",
    }
    pv = Table(
        title=f"First conversation ({report['preview']['where']}), ▶ = response start, ⟦…⟧ = control token",
        box=box.SIMPLE_HEAVY,
        title_justify="left",
        show_lines=False,
    )
    pv.add_column(f"student ({s['spec']})", ratio=1, overflow="fold")
    pv.add_column(f"teacher ({t['spec']})", ratio=1, overflow="fold")
    cells = []
    for side in ("student", "teacher"):
        text, started = Text(), False
        for piece, kind in segments[side]:
            if kind.startswith("response") and not started:
                text.append("▶", style="bold yellow")
                started = True
            text.append(piece, style=styles[kind])
        cells.append(text)
    pv.add_row(*cells)
    console.print(pv)

    eot = report["end_of_turn"]
    console.print(
        f"End of turn: student {eot['student']!r} → teacher {eot['teacher']!r}, paired in "
        f"{report['eot_mapped_fraction']:.1%} of samples\n"
    )

    at = Table(
        title=f"Alignment over {report['samples']} samples (mode: {report['mode']})",
        box=box.SIMPLE_HEAVY,
        title_justify="left",
    )
    at.add_column("metric")
    at.add_column("value", justify="right")
    at.add_column("meaning")
    rows = [
        ("student tokens", f"{report['student_tokens']}", "response tokens, end of turn included"),
        ("teacher tokens", f"{report['teacher_tokens']}", "the teacher's response tokens"),
        (
            "teacher/student ratio",
            f"{report['teacher_student_token_ratio']:.3f}",
            "teacher tokens per student token",
        ),
        (
            "1:1 fraction",
            f"{report['one_to_one_fraction']:.2%}",
            "student tokens matched by exactly one teacher token",
        ),
        ("covered fraction", f"{report['covered_fraction']:.2%}", "student tokens inside some chunk"),
        (
            "signal fraction",
            f"{report['signal_fraction']:.2%}",
            f"tokens with a teacher signal in {report['mode']} mode",
        ),
        ("chunk width mean", f"{report['mean_chunk_width']:.3f}", "longer side of a chunk, in tokens"),
        ("chunk width p99", f"{report['chunk_width_p99']:.1f}", ""),
        ("chunk width max", f"{report['max_chunk_width']}", ""),
        ("end of turn paired", f"{report['eot_mapped_fraction']:.2%}", "samples"),
        ("byte-mismatch samples", f"{report['byte_mismatch_samples']}", "bytes the teacher cannot reproduce"),
        (
            "normalised samples",
            f"{report['normalized_samples']}",
            "teacher rewrote text, aligned via offsets",
        ),
        (
            "context overflow",
            f"{report['context_overflow_samples']}",
            f"samples over max_teacher_tokens={report['max_teacher_tokens']}"
            + (f" ({report['max_teacher_tokens_source']})" if report["max_teacher_tokens_source"] else ""),
        ),
        (
            "longest teacher sequence",
            f"{report['teacher_sequence_tokens_max']}",
            "prompt + response (+ end of turn), untruncated",
        ),
    ]
    for k, v in report["unaligned_tokens_by_reason"].items():
        rows.append((f"unaligned: {k}", str(v), "student tokens"))
    for row in rows:
        at.add_row(*row)
    console.print(at)

    if report["byte_mismatch_examples"]:
        mt = Table(title="Byte mismatches (first examples)", box=box.SIMPLE_HEAVY, title_justify="left")
        mt.add_column("sample")
        mt.add_column("reasons")
        mt.add_column("detail", overflow="fold")
        for ex in report["byte_mismatch_examples"]:
            mt.add_row(ex["where"], ", ".join(ex["reasons"]), ex["detail"] or "")
        console.print(mt)

    probe = report.get("teacher")
    if probe:
        pt = Table(title=f"Teacher probe: {probe['url']}", box=box.SIMPLE_HEAVY, title_justify="left")
        pt.add_column("check")
        pt.add_column("value", overflow="fold")
        mi = probe.get("model_info") or {}
        si = probe.get("server_info") or {}

        def fmt(x: Any, spec: str = "") -> str:
            return "n/a" if x is None else format(x, spec)

        for row in (
            ("healthy", str(probe["healthy"])),
            ("model", str(mi.get("model_path", "n/a"))),
            ("context length", str(si.get("context_length", "n/a"))),
            ("max request tokens", str(si.get("max_req_input_len", "n/a"))),
            ("scored samples (x2)", str(probe["scored_samples"])),
            ("determinism max |Δ|", fmt(probe["determinism_max_abs_diff"], ".3g")),
            (
                "latency p50 / p99 (s)",
                f"{fmt(probe['latency_p50_s'], '.4f')} / {fmt(probe['latency_p99_s'], '.4f')}",
            ),
            ("mean teacher log-prob", fmt(probe["mean_teacher_logprob"], ".3f")),
            ("errors (bad responses)", f"{probe['errors']} ({probe['bad_responses']})"),
        ):
            pt.add_row(*row)
        console.print(pt)

    if report["warnings"]:
        console.print("[bold yellow]Warnings[/]")
        for w in report["warnings"]:
            console.print(Text("  • " + w, style="yellow"))
    n_warn = len(report["warnings"])
    verdict = {
        0: "[bold green]OK[/]: every sample's bytes align" + (f" ({n_warn} warnings above)" if n_warn else ""),
        1: "[bold red]FAIL[/]: see the byte mismatches / teacher probe above",
    }[report["exit_code"]]
    if report["exit_code"] == 0 and report["byte_mismatch_samples"]:
        verdict = "[bold yellow]OK with mismatches allowed[/] (--allow-mismatch)"
    console.print(verdict)


# --------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    from .assets import TOKENIZERS

    fams = ", ".join(TOKENIZERS)
    p = argparse.ArgumentParser(
        prog="slime-xvocab check",
        description="Preflight a teacher/student pair on your own data: how the two tokenizations of each "
        "response align, what the teacher sees, and (with --teacher-url) whether the live teacher answers "
        "correctly and deterministically.",
        epilog="Exit status: 0 every sample aligns; 1 some sample's bytes cannot be matched (unless "
        "--allow-mismatch) or the teacher probe failed; 2 bad usage or unreadable input. See docs/check.md.",
    )
    tok_help = (
        "a local model or tokenizer directory (AutoTokenizer.from_pretrained), or a bundled tokenizer "
        f"family name for convenience: {fams}"
    )
    p.add_argument("--student", required=True, metavar="TOK_OR_MODEL_DIR", help="student tokenizer: " + tok_help)
    p.add_argument(
        "--teacher",
        required=True,
        action="append",
        metavar="TOK_OR_MODEL_DIR",
        help="teacher tokenizer: " + tok_help + ". Repeat it for several teachers: each student/teacher pair is "
        "checked and printed in turn (template options apply to every teacher)",
    )
    p.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help="conversations, .jsonl (one object per line) or .parquet, as for slime's --prompt-data",
    )
    p.add_argument(
        "--messages-key",
        default="messages",
        help="field holding the message list; a dotted path "
        "walks nested objects, e.g. metadata.messages (default: messages)",
    )
    p.add_argument(
        "--response-key",
        default=None,
        help="field holding the response text; then every message "
        "is prompt. Default: the final assistant turn is the response, earlier messages the prompt",
    )
    p.add_argument(
        "--tools-key",
        default="tools",
        help="field holding tool definitions passed to both chat templates (default: tools; missing is fine)",
    )
    p.add_argument("--n", type=int, default=200, help="check the first N conversations (default 200)")
    p.add_argument(
        "--mode",
        choices=("student_token", "chunk", "exact"),
        default="student_token",
        help="credit mode training will use (xvocab_credit_mode); sets which fraction is the signal fraction "
        "(default student_token: every covered token, like chunk; exact: 1:1 tokens only)",
    )
    p.add_argument(
        "--teacher-url",
        default=None,
        action="append",
        help="probe a live SGLang teacher (or slime-xvocab "
        "serve-teacher) at this base URL, e.g. http://127.0.0.1:30000; with several --teacher, one per teacher "
        "in the same order",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help=f"teacher API key (default: ${API_KEY_ENV}, the variable the hooks read; never printed)",
    )
    p.add_argument(
        "--ca-bundle",
        default=None,
        help="PEM file of the CA(s) that sign an https teacher's certificate (xvocab_ca_bundle)",
    )
    p.add_argument("--teacher-timeout", type=float, default=60.0, help="seconds per teacher request (default 60)")
    p.add_argument("--probe-samples", type=int, default=8, help="samples scored twice by the probe (default 8)")
    p.add_argument(
        "--max-teacher-tokens",
        type=int,
        default=None,
        help="the teacher's context limit in tokens "
        "(prompt + response); default: the probed server's max_req_input_len, else no limit",
    )
    p.add_argument(
        "--template-kwargs",
        default=None,
        metavar="JSON",
        help="extra arguments for the teacher's "
        "chat template, as a JSON object, e.g. '{\"enable_thinking\": false}' (xvocab "
        "template_kwargs)",
    )
    p.add_argument(
        "--student-template-kwargs",
        default=None,
        metavar="JSON",
        help="extra arguments for the student's chat template (slime's --apply-chat-template-kwargs)",
    )
    p.add_argument(
        "--prompt-format",
        choices=("chat", "completion"),
        default="chat",
        help="how the teacher prompt is rendered: its chat template, or plain text for a base teacher (default chat)",
    )
    p.add_argument(
        "--system-prompt",
        choices=("keep", "drop", "teacher_default"),
        default="keep",
        help="what the teacher gets of the conversation's system messages (default keep)",
    )
    p.add_argument(
        "--end-of-turn",
        default=None,
        metavar="TOKEN",
        help="the teacher's end-of-turn token, overriding discovery from its chat template; 'unscored' leaves the "
        "student's end of turn unscored (base teachers)",
    )
    p.add_argument(
        "--rollout-temperature",
        type=float,
        default=None,
        metavar="T",
        help="the rollout temperature you will train with; warns unless 1",
    )
    p.add_argument(
        "--allow-mismatch",
        action="store_true",
        help="exit 0 even if some samples' bytes cannot be matched (they are still reported)",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow custom tokenizer code in a directory (AutoTokenizer trust_remote_code)",
    )
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout (logs go to stderr)")
    return p


def _parse_template_kwargs(raw: str | None, flag: str) -> dict:
    if raw is None:
        return {}
    try:
        value = json.loads(raw)
    except ValueError as e:
        raise InputError(f"{flag} is not JSON ({e}); pass an object like '{{\"enable_thinking\": false}}'") from None
    if not isinstance(value, dict):
        raise InputError(f"{flag} must be a JSON object, got {type(value).__name__}")
    return value


def _preview(
    first: SampleResult,
    conv: Conversation,
    student: TokenizerInfo,
    teacher: TokenizerInfo,
    student_kwargs: dict,
    unlimited: Any,
) -> tuple[dict[str, list[tuple[str, str]]], list[str]]:
    """Both sides' rendering of the first conversation (clipped), and warnings met while rendering."""
    warnings: list[str] = []
    try:
        s_prompt = render_prompt_ids(student.tokenizer, conv.prompt, conv.tools, student_kwargs)
        s_ids = s_prompt + response_ids(student.tokenizer, conv.response, student.eot_id)
        s_seg = token_segments(student.tokenizer, student.table, s_ids, len(s_prompt))
    except Exception as e:  # noqa: BLE001 - a template error must not hide the alignment report
        s_seg = [(f"(the student's chat template failed: {type(e).__name__}: {e})", "prompt")]
        warnings.append(f"the student's chat template cannot render {conv.where}: {e}")
    view = first.view
    if view is None and first.mismatch is None and unlimited is not None:  # the prompt alone overflows
        with contextlib.suppress(XVocabError, ValueError):
            view = unlimited.build(conv.prompt, response_ids(student.tokenizer, conv.response, student.eot_id))
    if view is not None:
        t_seg = token_segments(teacher.tokenizer, teacher.table, view.input_ids, view.response_start)
    else:
        t_seg = [(f"(no teacher view: {first.mismatch})", "prompt")]
    return {
        "student": _clip_segments(s_seg, PREVIEW_CHARS),
        "teacher": _clip_segments(t_seg, PREVIEW_CHARS),
    }, warnings


def run_check(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, list[tuple[str, str]]]]:
    """Do the whole check; returns the report (with ``exit_code``) and the preview segments.

    Raises:
        InputError: bad usage or unreadable input (exit status 2).
    """
    from .teacher_view import TeacherViewBuilder

    if args.n < 1:
        raise InputError(f"--n must be >= 1, got {args.n}")
    if args.max_teacher_tokens is not None and args.max_teacher_tokens < 1:
        raise InputError(f"--max-teacher-tokens must be >= 1, got {args.max_teacher_tokens}")
    if args.probe_samples < 1:
        raise InputError(f"--probe-samples must be >= 1, got {args.probe_samples}")
    kwargs = _parse_template_kwargs(args.template_kwargs, "--template-kwargs")
    student_kwargs = _parse_template_kwargs(args.student_template_kwargs, "--student-template-kwargs")
    convs, skipped = read_conversations(
        args.data,
        args.n,
        messages_key=args.messages_key,
        response_key=args.response_key,
        tools_key=args.tools_key,
    )
    logger.info("read %d conversations from %s", len(convs), args.data)

    infos = []
    for spec, kw in ((args.student, student_kwargs), (args.teacher, kwargs)):
        tok, family = load_tokenizer_spec(spec, trust_remote_code=args.trust_remote_code)
        try:
            table = token_bytes(tok)
        except XVocabError as e:
            raise InputError(f"{spec}: {e}") from None
        infos.append(TokenizerInfo(spec, tok, table, family, end_of_turn_id(tok, table, kw)))
    student, teacher = infos

    probe: dict[str, Any] | None = None
    max_teacher_tokens, limit_source = args.max_teacher_tokens, "--max-teacher-tokens"
    if args.api_key is None:
        args.api_key = env_api_key()
    if args.teacher_url:
        try:
            probe = asyncio.run(
                teacher_info(
                    args.teacher_url, timeout_s=args.teacher_timeout, api_key=args.api_key, ca_bundle=args.ca_bundle
                )
            )
        except ValueError as e:  # a malformed URL
            raise InputError(f"--teacher-url: {e}") from None
        server_limit = (probe.get("server_info") or {}).get("max_req_input_len")
        if max_teacher_tokens is None and isinstance(server_limit, int):
            max_teacher_tokens, limit_source = server_limit, "teacher /server_info max_req_input_len"
    if max_teacher_tokens is None:
        limit_source = None

    def make_builder(limit: int | None) -> Any:
        try:
            return TeacherViewBuilder(
                student.tokenizer,
                teacher.tokenizer,
                prompt_format=args.prompt_format,
                template_kwargs=kwargs,
                system_prompt=args.system_prompt,
                end_of_turn=args.end_of_turn,
                max_teacher_tokens=limit,
            )
        except XVocabError as e:
            fix = " (pass --prompt-format completion for a base teacher)" if "chat template" in str(e) else ""
            raise InputError(f"cannot build teacher views for this pair: {e}{fix}") from None

    builder = make_builder(max_teacher_tokens)
    unlimited = make_builder(None) if max_teacher_tokens is not None else None

    results: list[SampleResult] = []
    for i, conv in enumerate(convs):
        try:
            ids = response_ids(student.tokenizer, conv.response, student.eot_id)
        except Exception as e:  # noqa: BLE001 - e.g. lone surrogates the tokenizer refuses
            raise InputError(f"{conv.where}: the student tokenizer cannot encode the response: {e}") from None
        keep = i == 0 or (args.teacher_url is not None and i < args.probe_samples)
        results.append(
            analyse_sample(builder, conv, ids, student.table, teacher.table, keep_view=keep, unlimited=unlimited)
        )

    report: dict[str, Any] = {
        "tokenizers": {"student": student.describe(), "teacher": teacher.describe()},
        "data": str(args.data),
        "mode": args.mode,
        "max_teacher_tokens": max_teacher_tokens,
        "max_teacher_tokens_source": limit_source,
        "same_tokenizer": bool(builder.same_tokenizer),
        **aggregate(results, args.mode),
        "skipped_rows": len(skipped),
    }

    # Preview and the end-of-turn mapping come from the first sample.
    first, conv0 = results[0], convs[0]
    segments, preview_warnings = _preview(first, conv0, student, teacher, student_kwargs, unlimited)
    report["preview"] = {"where": conv0.where, **{k: segments_text(v) for k, v in segments.items()}}
    eot_ids = getattr(builder, "teacher_eot_ids", None)
    if eot_ids is None and first.view is not None:  # older builders: the control tokens ending the view
        v = first.view
        eot_ids = [int(i) for i in v.input_ids[v.response_start :] if teacher.table.special[int(i)]]
    report["end_of_turn"] = {
        "student": student.describe()["end_of_turn"],
        "teacher": " ".join(str(teacher.tokenizer.convert_ids_to_tokens(int(i))) for i in eot_ids or []) or None,
        "unscored_by_choice": args.end_of_turn == "unscored",
    }
    doubled_bos = False
    bos = teacher.tokenizer.bos_token_id
    if first.view is not None and isinstance(bos, int):
        doubled_bos = list(first.view.input_ids[:2]) == [bos, bos]

    if args.teacher_url and probe is not None:
        items = [
            (list(map(int, r.view.input_ids)), int(r.view.response_start))
            for r in results[: args.probe_samples]
            if r.view is not None and r.teacher_tokens > 0
        ]
        scores = asyncio.run(
            probe_scores(
                args.teacher_url, items, timeout_s=args.teacher_timeout, api_key=args.api_key, ca_bundle=args.ca_bundle
            )
        )
        probe["errors"] += scores.pop("errors")
        probe["error_messages"] += scores.pop("error_messages")
        probe.update(scores)
        report["teacher"] = probe

    report["warnings"] = (
        collect_warnings(
            report,
            same_tokenizer=bool(builder.same_tokenizer),
            student=student,
            teacher=teacher,
            student_no_gp=ignores_generation_prompt(student.tokenizer, student_kwargs),
            teacher_no_gp=args.prompt_format == "chat" and ignores_generation_prompt(teacher.tokenizer, kwargs),
            doubled_bos=doubled_bos,
            rollout_temperature=args.rollout_temperature,
            mode=args.mode,
            skipped=skipped,
        )
        + preview_warnings
    )
    failed = (report["byte_mismatch_samples"] and not args.allow_mismatch) or (probe and probe["errors"])
    report["exit_code"] = 1 if failed else 0
    return report, segments


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def cli_main(argv: list[str]) -> int:
    """``slime-xvocab check``; returns the exit status (0 ok, 1 mismatch or probe failure, 2 bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    logging.basicConfig(
        level=logging.INFO if not args.json else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    out = sys.stdout
    try:
        pairs = split_teachers(args)
        # Whatever a library prints while we work must not corrupt the JSON on stdout.
        with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
            results = [run_check(one) for one in pairs]
    except (InputError, ConfigError, SampleError) as e:
        print(f"slime-xvocab check: error: {e}", file=sys.stderr)
        if args.json:
            print(json.dumps({"error": str(e), "exit_code": 2}), file=out)
        return 2
    exit_code = max(int(report["exit_code"]) for report, _ in results)
    if args.json:
        if len(results) == 1:
            body: dict[str, Any] = results[0][0]
        else:
            reports = {one.teacher: report for one, (report, _) in zip(pairs, results)}
            body = {"teachers": reports, "exit_code": exit_code}
        print(json.dumps(body, default=_json_default, ensure_ascii=False), file=out)
    else:
        from rich.console import Console

        console = Console(file=out, width=None if out.isatty() or "COLUMNS" in os.environ else 120, highlight=False)
        for one, (report, segments) in zip(pairs, results):
            if len(results) > 1:
                console.rule(f"student {one.student}  <-  teacher {one.teacher}")
            print_report(report, segments, console)
    return exit_code


def split_teachers(args: argparse.Namespace) -> list[argparse.Namespace]:
    """One namespace per ``--teacher`` (with its ``--teacher-url``), for :func:`run_check`.

    Raises:
        InputError: ``--teacher-url`` given, but not once per ``--teacher``.
    """
    teachers = args.teacher if isinstance(args.teacher, list) else [args.teacher]
    urls = args.teacher_url if isinstance(args.teacher_url, list) else [args.teacher_url]
    urls = [u for u in urls if u is not None]
    if urls and len(urls) != len(teachers):
        raise InputError(
            f"{len(teachers)} --teacher but {len(urls)} --teacher-url: give one URL per teacher, in the same order"
        )
    out = []
    for i, teacher in enumerate(teachers):
        one = argparse.Namespace(**vars(args))
        one.teacher, one.teacher_url = teacher, urls[i] if urls else None
        out.append(one)
    return out


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
