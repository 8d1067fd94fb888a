"""The teacher's view of a rollout: the conversation in the teacher's own chat template, the student's
response bytes in the teacher's own tokens, and the teacher's own end-of-turn token.

A student rollout is ``student prompt ids + student response ids``. A teacher with another tokenizer
cannot score those ids, and it should not score the student's *chat template* either: a model conditions
on the format it was trained with. :class:`TeacherViewBuilder` therefore builds, per sample::

    teacher prompt   = teacher.apply_chat_template(messages, add_generation_prompt=True)   (its own format)
    teacher response = the student's response bytes, encoded by the teacher            (byte-exact)
    teacher EOT      = the teacher's end-of-turn token(s), only if the student ended its turn

and an :class:`~slime_xvocab.alignment.Alignment` from student response positions to teacher positions
``input_ids[response_start:]``. The prompt and the response are encoded separately, so no teacher token
straddles the split and ``response_start`` is exact.

Example:
    >>> builder = TeacherViewBuilder(qwen3_tok, llama_tok)
    >>> view = builder.build([{"role": "user", "content": "2+2?"}], student_response_ids, sample_id=7)
    >>> view.input_ids[view.response_start:]          # what the teacher scores
    >>> view.alignment.student_chunk                   # which teacher chunk each student position feeds

:meth:`TeacherViewBuilder.build` is pure CPU work over immutable state, so it may run in worker threads
(``asyncio.to_thread``) concurrently. Every teacher-tokenizer encode holds :func:`tokenizer_lock`,
because transformers implements ``split_special_tokens`` by flipping a flag on the shared tokenizer.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .alignment import (
    Alignment,
    TeacherEncoding,
    Unaligned,
    align_response_bytes,
    align_spans,
    response_spans,
    spans_from_lengths,
)
from .errors import ConfigError, SampleError
from .token_bytes import TokenBytes, token_bytes, tokenizer_lock

logger = logging.getLogger(__name__)

PROMPT_FORMATS = ("chat", "completion")
SYSTEM_PROMPT_POLICIES = ("keep", "drop", "teacher_default")
DEFAULT_COMPLETION_TEMPLATE = "{content}\n\n"

# End-of-turn / end-of-sequence markers of common chat formats. A student response that ends with one of
# these (when it is a special token of the student) ended its turn.
KNOWN_END_MARKERS = (
    "<|im_end|>",  # ChatML: Qwen, SmolLM2
    "<|eot_id|>",  # Llama-3
    "<|eom_id|>",  # Llama-3 (end of message, tool call follows)
    "<|end_of_text|>",  # Llama-3 base
    "<end_of_turn>",  # Gemma
    "<｜end▁of▁sentence｜>",  # DeepSeek
    "<|end|>",  # Phi-3
    "<|endoftext|>",  # GPT-2, Qwen base
    "</s>",  # Llama-2, Mistral
    "<eos>",  # Gemma base
)

_SENTINEL = "XVOCABSENTINELQ7"
#: Distinct prompts whose teacher rendering and ids a builder keeps (least recently used dropped first).
PROMPT_CACHE_SIZE = 4096
END_OF_TURN_UNSCORED = "unscored"  # end_of_turn value: do not score the student's end of turn


@dataclass(frozen=True, eq=False)
class TeacherView:
    """What the teacher scores for one sample, and how it maps back to the student.

    Attributes:
        input_ids: teacher prompt ids + teacher response ids (+ teacher end-of-turn ids).
        response_start: ``len(teacher prompt ids)``; the teacher scores ``input_ids[response_start:]``.
        alignment: student response positions <-> teacher positions ``input_ids[response_start:]``
            (``alignment.n_teacher == len(input_ids) - response_start``).
        eot_mapped: the student's final end-of-turn token was paired with the teacher's end-of-turn ids.
        teacher_truncated_tokens: teacher response tokens dropped to fit ``max_teacher_tokens``.
        exact_bytes: the teacher's response tokens spell the student's response bytes exactly (False when
            the teacher's normaliser rewrote text or bytes were invalid UTF-8; spans then come from offsets).
        prompt_text: the teacher prompt as text (for previews and debugging).
        eot_ids: the teacher end-of-turn ids appended (empty if none).
        probe_ids: one id appended after the text when the response does not end its turn (cut by length, or
            the end of turn unscored) and the builder was asked to probe: its log-prob means nothing, but the
            teacher's top-k at that position is its distribution after the whole text, which
            :func:`~slime_xvocab.credit.student_token_credit` needs to value the last student token.
        sample_id: the sample id given to :meth:`TeacherViewBuilder.build`, for messages.
        response_bytes: the bytes the student's response spells.
        student_spans, teacher_spans: int64 ``[n, 2]`` byte spans of every student response token and every
            teacher token after ``response_start`` in ``response_bytes`` (zero-width for control tokens).
        student_ids: int64 ``[n]``: the student's response ids (what
            :func:`~slime_xvocab.credit.student_token_credit` asks the student tokenizer about).
    """

    input_ids: list[int]
    response_start: int
    alignment: Alignment
    eot_mapped: bool
    teacher_truncated_tokens: int
    exact_bytes: bool
    prompt_text: str = ""
    eot_ids: tuple[int, ...] = ()
    probe_ids: tuple[int, ...] = ()
    sample_id: object = None
    response_bytes: bytes = b""
    student_spans: np.ndarray | None = None
    teacher_spans: np.ndarray | None = None
    student_ids: np.ndarray | None = None

    @property
    def response_ids(self) -> list[int]:
        """The teacher ids the teacher scores (response tokens, then end-of-turn ids)."""
        return self.input_ids[self.response_start:]

    @property
    def prompt_ids(self) -> list[int]:
        return self.input_ids[: self.response_start]


# --------------------------------------------------------------------------------------------------
# Thread safety

# tokenizer_lock lives in token_bytes (alignment.encode_bytes takes it too); re-exported here.


# --------------------------------------------------------------------------------------------------
# Messages: validation and lookup


def _where(sample_id) -> str:
    return f"sample {sample_id}: " if sample_id is not None else ""


def validate_messages(messages, *, sample_id=None, field: str = "messages") -> list[dict]:
    """Check that ``messages`` is a non-empty list of ``{"role": str, "content": ...}`` dicts.

    ``content`` may be a string, a list of content parts (multimodal) or None (an assistant message that
    only carries ``tool_calls``). Extra keys (``tool_calls``, ``name``, ``reasoning_content``) pass through.

    Raises:
        SampleError: naming the sample, the field and the offending message.
    """
    fix = (
        "Each row needs its prompt as a list of {'role', 'content'} messages: use --data-source-path "
        "slime_xvocab.data_source.MessagesDataSource, or write them into the metadata column with "
        "`python -m slime_xvocab.data_source`."
    )
    if not isinstance(messages, list):
        raise SampleError(
            f"{_where(sample_id)}{field} must be a list of chat messages, "
            f"got {type(messages).__name__}. {fix}"
        )
    if not messages:
        raise SampleError(f"{_where(sample_id)}{field} is an empty list; the teacher needs the prompt. {fix}")
    for k, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise SampleError(
                f"{_where(sample_id)}{field}[{k}] must be a dict with 'role' and 'content', "
                f"got {type(message).__name__}. {fix}"
            )
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise SampleError(f"{_where(sample_id)}{field}[{k}] has no string 'role' (got {role!r}). {fix}")
        if "content" not in message and "tool_calls" not in message:
            raise SampleError(f"{_where(sample_id)}{field}[{k}] (role {role!r}) has no 'content'. {fix}")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise SampleError(
                f"{_where(sample_id)}{field}[{k}].content must be a string or a list of content parts, "
                f"got {type(content).__name__}. {fix}"
            )
    return list(messages)


#: Roles every chat template is written for; others count only when the template names them.
STANDARD_ROLES = ("system", "user", "assistant", "tool")


def template_roles(template: Any) -> set[str]:
    """The roles a chat template handles: the standard ones plus every other role it names in quotes
    (e.g. Llama-3.1's ``'ipython'``); a template that names none of them (or no template) gets the standard set."""
    text = template if isinstance(template, str) else ""
    if isinstance(template, Mapping):  # named templates: {"default": ..., "tool_use": ...}
        text = "\n".join(str(t) for t in template.values())
    elif isinstance(template, list):
        text = "\n".join(str(t.get("template", "")) for t in template if isinstance(t, Mapping))
    named = set(re.findall(r"""role['"]?\]?\s*==\s*['"]([A-Za-z_][\w-]*)['"]""", text))
    return set(STANDARD_ROLES) | named


def check_roles(messages: Sequence[Mapping], template: Any, *, sample_id=None) -> None:
    """Raise a SampleError for a role the teacher template does not handle, or a prompt without a user turn.

    Some templates render any role as a header (Llama-3.1) and would score ``"robot"`` silently; others
    reject it (Gemma-3). Both get the same clear error here, naming the sample, the message and the role.
    """
    handled = template_roles(template)
    for k, message in enumerate(messages):
        role = message.get("role")
        if role not in handled:
            raise SampleError(
                f"{_where(sample_id)}messages[{k}] has role {role!r}, which the teacher's chat template does "
                f"not handle (it handles: {', '.join(sorted(handled))}); map it to one of those in the data"
            )
    if not any(m.get("role") == "user" for m in messages):
        roles = [m.get("role") for m in messages]
        raise SampleError(
            f"{_where(sample_id)}the prompt has no 'user' message (roles {roles}); the teacher's chat template "
            "needs a user turn before the response"
        )


def get_path(metadata: Mapping, key: str):
    """``metadata[key]``, or the nested value at dotted path ``key`` (``"a.b"`` -> ``metadata["a"]["b"]``).

    Returns None if absent. A literal key containing dots wins over the nested path.
    """
    if key in metadata:
        return metadata[key]
    node = metadata
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def messages_from_metadata(metadata: dict, key: str, *, sample_id=None) -> list[dict]:
    """The prompt messages stored in ``sample.metadata`` under ``key`` (dotted path allowed), validated.

    A JSON string (as parquet or a CSV export may store it) is decoded first.

    Raises:
        SampleError: metadata is missing the key, or its value is not a list of chat messages.
    """
    if not isinstance(metadata, Mapping):
        raise SampleError(
            f"{_where(sample_id)}sample.metadata must be a dict, got {type(metadata).__name__}; "
            f"the teacher's prompt messages are read from metadata[{key!r}]"
        )
    value = get_path(metadata, key)
    if value is None:
        raise SampleError(
            f"{_where(sample_id)}sample.metadata has no {key!r} (keys: {sorted(metadata)[:10]}): the "
            "teacher needs the raw prompt messages. Use --data-source-path "
            "slime_xvocab.data_source.MessagesDataSource (keeps them automatically), or store them in each "
            "row's metadata column (`python -m slime_xvocab.data_source --in rows.jsonl --out "
            "rows_with_messages.jsonl`), or set "
            "xvocab_messages_key to the key that holds them."
        )
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise SampleError(
                f"{_where(sample_id)}metadata[{key!r}] is a string that is not JSON ({e}); store the "
                "messages as a list of {'role', 'content'} dicts"
            ) from None
    return validate_messages(value, sample_id=sample_id, field=f"metadata[{key!r}]")


# --------------------------------------------------------------------------------------------------
# End-of-turn discovery


def _as_id_list(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (int, np.integer)):
        return [int(value)]
    return [int(v) for v in value if v is not None]


def _generation_config_eos(tokenizer) -> list[int]:
    """``eos_token_id`` from a ``generation_config.json`` next to the tokenizer files, if there is one."""
    path = str(getattr(tokenizer, "name_or_path", "") or "")
    file = os.path.join(path, "generation_config.json")
    if not path or not os.path.isfile(file):
        return []
    try:
        with open(file, encoding="utf-8") as f:
            return _as_id_list(json.load(f).get("eos_token_id"))
    except (OSError, ValueError, TypeError):
        return []


def template_end_of_turn(tokenizer, table: TokenBytes, template_kwargs: Mapping | None = None) -> list[int]:
    """The special token(s) the chat template writes right after an assistant message's content.

    Renders a one-turn conversation whose assistant content is a sentinel word and encodes what follows
    it: ``<|im_end|>`` for ChatML (Qwen, SmolLM2), ``<|eot_id|>`` for Llama-3, ``<end_of_turn>`` for
    Gemma, ``<｜end▁of▁sentence｜>`` for DeepSeek. Returns the first run of special ids there, or ``[]``
    (no template, a template that rejects the probe, or no special token after the content).
    """
    if not getattr(tokenizer, "chat_template", None):
        return []
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **dict(template_kwargs or {}))
    except Exception:  # templates may reject the probe (role checks, required kwargs): no template answer
        return []
    if not isinstance(text, str) or _SENTINEL not in text:
        return []
    tail = text[text.rindex(_SENTINEL) + len(_SENTINEL):]
    with tokenizer_lock(tokenizer):
        ids = tokenizer.encode(tail, add_special_tokens=False)
    special = [bool(table.special[i]) if 0 <= i < table.vocab_size else False for i in ids]
    if True not in special:
        return []
    first = special.index(True)
    run = []
    for token_id, is_special in zip(ids[first:], special[first:], strict=True):
        if not is_special:
            break
        run.append(int(token_id))
    return run


def student_end_ids(tokenizer, table: TokenBytes, template_kwargs: Mapping | None = None) -> frozenset[int]:
    """Every id that ends a student turn: EOS id(s), generation-config EOS ids, the template's
    end-of-turn token, and known end markers (:data:`KNOWN_END_MARKERS`) that are special in this vocab."""
    ids = set(_as_id_list(getattr(tokenizer, "eos_token_id", None)))
    ids.update(_generation_config_eos(tokenizer))
    ids.update(template_end_of_turn(tokenizer, table, template_kwargs))
    vocab_size = table.vocab_size
    for marker in KNOWN_END_MARKERS:
        token_id = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(token_id, int) and 0 <= token_id < vocab_size and table.special[token_id]:
            if token_id != getattr(tokenizer, "unk_token_id", None):
                ids.add(token_id)
    return frozenset(i for i in ids if 0 <= i < vocab_size)


def _resolve_end_of_turn(tokenizer, spec: str | Sequence[int]) -> list[int]:
    """Teacher end-of-turn override: a token string (one vocabulary entry, or text to encode) or ids."""
    if isinstance(spec, str):
        token_id = tokenizer.convert_tokens_to_ids(spec)
        unk = getattr(tokenizer, "unk_token_id", None)
        if isinstance(token_id, int) and token_id >= 0 and (token_id != unk or spec == tokenizer.unk_token):
            return [token_id]
        with tokenizer_lock(tokenizer):
            ids = tokenizer.encode(spec, add_special_tokens=False)
        if not ids:
            raise ConfigError(f"end_of_turn={spec!r} encodes to no teacher tokens")
        return list(ids)
    ids = _as_id_list(spec)
    if not ids:
        raise ConfigError("end_of_turn must be a token string or a non-empty list of teacher token ids")
    return ids


# --------------------------------------------------------------------------------------------------
# The builder


def _same_tokenizer(student, teacher, s_table: TokenBytes, t_table: TokenBytes) -> bool:
    if student is teacher:
        return True
    if s_table.vocab_size != t_table.vocab_size or s_table.scheme != t_table.scheme:
        return False
    if not (
        np.array_equal(s_table.offsets, t_table.offsets)
        and np.array_equal(s_table.special, t_table.special)
        and np.array_equal(s_table.blob, t_table.blob)
    ):
        return False
    return student.get_vocab() == teacher.get_vocab()


def _with_end_of_turn(alignment: Alignment, n_eot: int, truncated: bool) -> Alignment:
    """The alignment of a response that ends its turn: the student's final (end-of-turn) position is appended,
    paired with the teacher's ``n_eot`` end-of-turn ids appended after the text as one more chunk, or left
    unaligned without them (``SPECIAL``; ``TEACHER_CONTEXT`` when the teacher's context cut the response).

    Same result as appending the unaligned positions and then :meth:`Alignment.with_pair`, in fewer copies.
    """
    if not n_eot:
        reason = Unaligned.TEACHER_CONTEXT if truncated else Unaligned.SPECIAL
        return Alignment(
            np.append(alignment.student_chunk, -1),
            alignment.teacher_chunk,
            np.append(alignment.reason, np.int8(reason)),
            alignment.num_chunks,
        )
    chunk = alignment.num_chunks
    return Alignment(
        np.append(alignment.student_chunk, chunk),
        np.concatenate([alignment.teacher_chunk, np.full(n_eot, chunk, dtype=np.int64)]),
        np.append(alignment.reason, np.int8(Unaligned.ALIGNED)),
        chunk + 1,
    )


class TeacherViewBuilder:
    """Builds :class:`TeacherView` objects for one (student, teacher) tokenizer pair.

    Args:
        student_tokenizer: the student's (policy's) Hugging Face tokenizer.
        teacher_tokenizer: the teacher's Hugging Face tokenizer.
        prompt_format: ``"chat"``: the teacher's own ``apply_chat_template`` renders the prompt messages;
            ``"completion"``: for base teachers without a chat template, every message is rendered with
            ``completion_template`` and the results are concatenated (a string prompt is used verbatim).
        template_kwargs: extra keyword arguments for the teacher's template (e.g. ``{"enable_thinking":
            False}`` for a Qwen3 teacher). The student's ``--apply-chat-template-kwargs`` are *not* forwarded.
        system_prompt: ``"keep"`` renders the conversation's system message(s); ``"drop"`` and
            ``"teacher_default"`` remove them, so a teacher template that has a default system prompt
            (Llama-3.1's date header, SmolLM2's persona) writes its own. Both render identically;
            ``teacher_default`` states the intent.
        end_of_turn: the teacher's end-of-turn token(s), overriding discovery (template, then EOS);
            ``"unscored"`` leaves the student's end of turn unscored (it keeps its own log-prob, OPD delta 0),
            for base teachers that never learned where a chat turn ends.
        student_end_of_turn: ids that end a student turn, overriding discovery.
        max_teacher_tokens: the teacher's context budget for prompt + response + end-of-turn. Response
            tokens past it are dropped (their student positions unaligned, ``TEACHER_CONTEXT``).
        probe_next: when a response does not end its turn, append one probe id after the text (within
            ``max_teacher_tokens``) so the teacher's top-k after the whole text comes back
            (:attr:`TeacherView.probe_ids`); ``student_token`` credit needs it.
        completion_template: per-message format string for ``prompt_format="completion"``, with fields
            ``{role}`` and ``{content}``; default ``"{content}\\n\\n"``.

    Raises:
        ConfigError: an unknown option, a chat-format teacher without a chat template, a bad template.
    """

    def __init__(
        self,
        student_tokenizer,
        teacher_tokenizer,
        *,
        prompt_format: str = "chat",
        template_kwargs: dict | None = None,
        system_prompt: str = "keep",
        end_of_turn: str | Sequence[int] | None = None,
        student_end_of_turn: Sequence[int] | None = None,
        max_teacher_tokens: int | None = None,
        completion_template: str = DEFAULT_COMPLETION_TEMPLATE,
        probe_next: bool = False,
    ) -> None:
        problems = []
        if prompt_format not in PROMPT_FORMATS:
            problems.append(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
        if system_prompt not in SYSTEM_PROMPT_POLICIES:
            problems.append(f"system_prompt must be one of {SYSTEM_PROMPT_POLICIES}, got {system_prompt!r}")
        bad_limit = not isinstance(max_teacher_tokens, int) or max_teacher_tokens < 1
        if max_teacher_tokens is not None and bad_limit:
            problems.append(f"max_teacher_tokens must be a positive int or None, got {max_teacher_tokens!r}")
        if template_kwargs is not None and not isinstance(template_kwargs, Mapping):
            problems.append(f"template_kwargs must be a dict, got {type(template_kwargs).__name__}")
        if prompt_format == "chat" and not getattr(teacher_tokenizer, "chat_template", None):
            problems.append(
                f"the teacher tokenizer {getattr(teacher_tokenizer, 'name_or_path', '')!r} has no chat "
                "template; "
                'use prompt_format="completion" for a base teacher (optionally with completion_template), '
                "or load a tokenizer that ships one"
            )
        if prompt_format == "completion":
            try:
                completion_template.format(role="user", content="x")
            except (KeyError, IndexError, ValueError, AttributeError) as e:
                problems.append(
                    f"completion_template {completion_template!r} is not a format string with only "
                    f"{{role}} and {{content}} fields ({type(e).__name__}: {e})"
                )
        if problems:
            raise ConfigError("\n".join(problems))

        self.student_tokenizer = student_tokenizer
        self.teacher_tokenizer = teacher_tokenizer
        self.prompt_format = prompt_format
        self.template_kwargs = dict(template_kwargs or {})
        self.system_prompt = system_prompt
        self.max_teacher_tokens = max_teacher_tokens
        self.completion_template = completion_template
        self.probe_next = bool(probe_next)
        self._prompt_cache: OrderedDict[str, tuple[str, list[int]]] = OrderedDict()
        self._prompt_lock = threading.Lock()
        self._teacher_lock = tokenizer_lock(teacher_tokenizer)
        self.student_table = token_bytes(student_tokenizer)
        self.teacher_table = token_bytes(teacher_tokenizer)
        self._same = _same_tokenizer(
            student_tokenizer, teacher_tokenizer, self.student_table, self.teacher_table
        )

        if student_end_of_turn is not None:
            self.student_end_ids = frozenset(_as_id_list(student_end_of_turn))
        else:
            self.student_end_ids = student_end_ids(student_tokenizer, self.student_table)
        if end_of_turn == END_OF_TURN_UNSCORED:
            eot = []
        elif end_of_turn is not None:
            eot = _resolve_end_of_turn(teacher_tokenizer, end_of_turn)
        else:
            eot = template_end_of_turn(teacher_tokenizer, self.teacher_table, self.template_kwargs)
            if prompt_format == "completion" or not eot:
                eot = _as_id_list(getattr(teacher_tokenizer, "eos_token_id", None))[:1]
        self.teacher_eot_ids: tuple[int, ...] = tuple(eot)
        if not self.teacher_eot_ids and not self._same and end_of_turn != END_OF_TURN_UNSCORED:
            logger.warning(
                "teacher tokenizer %r has no end-of-turn or EOS token; the student's end-of-turn positions "
                "get no teacher signal (pass end_of_turn=... to set one)",
                getattr(teacher_tokenizer, "name_or_path", ""),
            )
        # Completion prompts get the BOS-like prefix the teacher's own encode() adds (base models were
        # trained with it); chat templates write their own BOS, so chat prompts get nothing added.
        self._completion_prefix: list[int] = []
        if prompt_format == "completion":
            with self._teacher_lock:
                plain = teacher_tokenizer.encode("a", add_special_tokens=False)
                full = teacher_tokenizer.encode("a", add_special_tokens=True)
            for k in range(len(full) - len(plain) + 1):
                if full[k:k + len(plain)] == plain:
                    self._completion_prefix = list(full[:k])
                    break

    @property
    def same_tokenizer(self) -> bool:
        """True if student and teacher tokenizers are identical (same ids, bytes, specials and vocab)."""
        return self._same

    # -- prompt --------------------------------------------------------------------------------------

    def _apply_system_policy(self, messages: list[dict]) -> list[dict]:
        if self.system_prompt == "keep":
            return messages
        return [m for m in messages if m.get("role") != "system"]

    def teacher_prompt_text(self, messages: list[dict] | str, *, tools=None, sample_id=None) -> str:
        """The teacher prompt as text (before encoding); see :meth:`teacher_prompt_ids`."""
        if isinstance(messages, str):
            if self.prompt_format == "completion":
                return messages
            messages = [{"role": "user", "content": messages}]
        messages = self._apply_system_policy(validate_messages(messages, sample_id=sample_id))
        if not messages:
            raise SampleError(
                f"{_where(sample_id)}the prompt has only a system message, and system_prompt="
                f"{self.system_prompt!r} removes it; nothing is left for the teacher"
            )
        if self.prompt_format == "completion":
            parts = []
            for m in messages:
                content = m.get("content") or ""
                if not isinstance(content, str):
                    raise SampleError(
                        f"{_where(sample_id)}a {m['role']!r} message has non-text content; "
                        'prompt_format="completion" renders text only'
                    )
                parts.append(self.completion_template.format(role=m["role"], content=content))
            return "".join(parts)
        check_roles(messages, getattr(self.teacher_tokenizer, "chat_template", None), sample_id=sample_id)
        kwargs = dict(self.template_kwargs)
        if tools is not None:
            kwargs["tools"] = tools
        try:
            text = self.teacher_tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, **kwargs
            )
        except Exception as e:  # jinja raise_exception(), bad kwargs: name the sample
            raise SampleError(
                f"{_where(sample_id)}the teacher's chat template rejected the prompt messages "
                f"({type(e).__name__}: {e}). Check the roles/order the teacher template accepts, "
                "the system_prompt policy, or template_kwargs."
            ) from e
        if not isinstance(text, str):
            raise SampleError(
                f"{_where(sample_id)}the teacher's chat template returned {type(text).__name__}, not text"
            )
        return text

    def teacher_prompt_ids(self, messages: list[dict] | str, *, tools=None, sample_id=None) -> list[int]:
        """Teacher prompt ids: the teacher's rendering, encoded without adding special tokens.

        Chat templates write their own BOS, so nothing is added (no doubled BOS, and no BOS where the
        template has none). Completion prompts get the prefix the teacher's ``encode`` adds by default.
        """
        text = self.teacher_prompt_text(messages, tools=tools, sample_id=sample_id)
        return self._encode_prompt(text)

    def _encode_prompt(self, text: str) -> list[int]:
        with self._teacher_lock:
            ids = list(self.teacher_tokenizer.encode(text, add_special_tokens=False))
        if self.prompt_format == "completion":
            ids = self._completion_prefix + ids
        return ids

    def _prompt(self, messages, tools, sample_id) -> tuple[str, list[int]]:
        """The teacher prompt's text and ids, cached per distinct (messages, tools): a GRPO group's samples
        share one prompt, and rendering plus encoding it costs more than aligning a short response."""
        try:
            key = json.dumps([messages, tools], sort_keys=True, ensure_ascii=False)
        except (TypeError, ValueError):  # not JSON-able: render every time
            key = None
        if key is not None:
            with self._prompt_lock:
                hit = self._prompt_cache.get(key)
                if hit is not None:
                    self._prompt_cache.move_to_end(key)
                    return hit
        text = self.teacher_prompt_text(messages, tools=tools, sample_id=sample_id)
        entry = (text, self._encode_prompt(text))
        if key is not None:
            with self._prompt_lock:
                self._prompt_cache[key] = entry
                if len(self._prompt_cache) > PROMPT_CACHE_SIZE:
                    self._prompt_cache.popitem(last=False)
        return entry

    # -- the view ------------------------------------------------------------------------------------

    def build(
        self,
        messages: list[dict] | str,
        student_response_ids: Sequence[int],
        *,
        tools=None,
        sample_id=None,
    ) -> TeacherView:
        """Build the teacher's view of one sample.

        Args:
            messages: the prompt messages (the conversation before the response being scored; earlier
                assistant turns are rendered by the teacher template), or a prompt string.
            student_response_ids: the student's response ids (``sample.tokens[-sample.response_length:]``).
            tools: tool schemas for the teacher template (``sample.metadata["tools"]``), or None.
            sample_id: for error messages.

        Returns:
            The :class:`TeacherView`.

        Raises:
            SampleError: bad messages, ids outside the student vocabulary, a prompt the teacher template
                rejects, or a teacher prompt that alone fills ``max_teacher_tokens``.
        """
        response = np.asarray(student_response_ids, dtype=np.int64).reshape(-1)
        if response.size and (response.min() < 0 or response.max() >= self.student_table.vocab_size):
            bad = response[(response < 0) | (response >= self.student_table.vocab_size)][:5].tolist()
            raise SampleError(
                f"{_where(sample_id)}response token ids {bad} are outside the student vocabulary "
                f"({self.student_table.vocab_size}); is student_tokenizer the policy's tokenizer?"
            )
        prompt_text, prompt_ids = self._prompt(messages, tools, sample_id)
        limit = self.max_teacher_tokens
        if limit is not None and len(prompt_ids) >= limit:
            raise SampleError(
                f"{_where(sample_id)}the teacher prompt alone is {len(prompt_ids)} tokens, which leaves no "
                f"room for the response within max_teacher_tokens={limit}; raise the teacher's context "
                "limit or filter long prompts (--rollout-max-prompt-len)"
            )
        room = None if limit is None else limit - len(prompt_ids)
        ends_turn = bool(response.size) and int(response[-1]) in self.student_end_ids
        if self._same:
            return self._identity_view(prompt_ids, prompt_text, response, room, ends_turn, sample_id)

        text_ids = response[:-1] if ends_turn else response
        lengths = self.student_table.lengths_of(response)  # read once: the alignment and the spans share them
        data = self.student_table.bytes_of(text_ids)
        with self._teacher_lock:
            encoding, alignment = align_response_bytes(
                data, lengths[: len(text_ids)], self.teacher_tokenizer, self.teacher_table
            )
        eot = list(self.teacher_eot_ids) if ends_turn else []
        truncated = 0
        if room is not None and len(encoding.ids) + len(eot) > room:
            # Over budget: keep what fits and drop the end of turn, because the teacher never saw the
            # bytes before it, so its probability of ending the turn there means nothing.
            keep = min(len(encoding.ids), room)
            truncated = len(encoding.ids) - keep + len(eot)  # the end-of-turn ids count as dropped too
            eot = []
            encoding = TeacherEncoding(
                encoding.ids[:keep], encoding.spans[:keep], encoding.exact, encoding.invalid_bytes
            )
            alignment = align_spans(
                spans_from_lengths(lengths[: len(text_ids)]),
                encoding.spans,
                invalid_bytes=encoding.invalid_bytes,
                tail_reason=Unaligned.TEACHER_CONTEXT,
            )
        if ends_turn:
            alignment = _with_end_of_turn(alignment, len(eot), truncated > 0)
        probe = []
        if self.probe_next and not eot and not truncated and (room is None or len(encoding.ids) < room):
            probe = [self._probe_id(encoding.ids)]
            alignment = Alignment(
                alignment.student_chunk, np.append(alignment.teacher_chunk, -1), alignment.reason,
                alignment.num_chunks,
            )
        input_ids = prompt_ids + encoding.ids.tolist() + eot + probe
        end = np.full((len(eot) + len(probe), 2), len(data), dtype=np.int64)
        return TeacherView(
            input_ids=input_ids,
            response_start=len(prompt_ids),
            alignment=alignment,
            eot_mapped=bool(eot),
            teacher_truncated_tokens=truncated,
            exact_bytes=bool(encoding.exact),
            prompt_text=prompt_text,
            eot_ids=tuple(eot),
            probe_ids=tuple(probe),
            sample_id=sample_id,
            response_bytes=data,
            student_spans=spans_from_lengths(lengths),
            teacher_spans=np.concatenate([encoding.spans.reshape(-1, 2), end]),
            student_ids=response,
        )

    def _probe_id(self, response_ids: np.ndarray) -> int:
        """Any id will do (only the top-k at its position is read); the end of turn is the most natural."""
        if self.teacher_eot_ids:
            return int(self.teacher_eot_ids[0])
        eos = _as_id_list(getattr(self.teacher_tokenizer, "eos_token_id", None))
        return int(eos[0]) if eos else int(response_ids[-1]) if len(response_ids) else 0

    def _identity_view(self, prompt_ids, prompt_text, response, room, ends_turn, sample_id) -> TeacherView:
        """Same tokenizer: the teacher scores the student's own response ids, position for position."""
        n = len(response)
        keep = n if room is None else min(n, room)
        student_chunk = np.full(n, -1, dtype=np.int64)
        student_chunk[:keep] = np.arange(keep)
        reason = np.zeros(n, dtype=np.int8)
        reason[keep:] = Unaligned.TEACHER_CONTEXT
        alignment = Alignment(student_chunk, np.arange(keep, dtype=np.int64), reason, keep)
        spans = response_spans(response, self.student_table)
        return TeacherView(
            input_ids=prompt_ids + response[:keep].tolist(),
            response_start=len(prompt_ids),
            alignment=alignment,
            eot_mapped=ends_turn and keep == n,
            teacher_truncated_tokens=n - keep,
            exact_bytes=True,
            prompt_text=prompt_text,
            eot_ids=(int(response[-1]),) if ends_turn and keep == n else (),
            sample_id=sample_id,
            response_bytes=self.student_table.bytes_of(response),
            student_spans=spans,
            teacher_spans=spans[:keep],
            student_ids=response,
        )
