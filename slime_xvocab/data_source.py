"""A slime data source that keeps each row's raw chat messages for the teacher.

slime's loader renders the prompt with the *student's* chat template and then forgets the messages
(``--apply-chat-template``). A teacher with another chat template needs those messages.
:class:`MessagesDataSource` loads the data the way slime does and renders the same student prompt, but
first copies the messages into ``sample.metadata[key]``, where the teacher view reads them. ``key`` is
``args.xvocab_messages_key`` (default ``"messages"``; a dotted path ``"a.b"`` stores a nested value).

Use it with::

    --data-source-path slime_xvocab.data_source.MessagesDataSource

Rows whose metadata column already holds the messages need no custom class. That is also how **eval
datasets** get them, since slime builds eval datasets itself without the data source. Preprocess the
eval file once::

    python -m slime_xvocab.data_source --in eval.jsonl --out eval_with_messages.jsonl \\
        [--input-key input] [--metadata-key metadata] [--messages-key messages]

slime is imported lazily. Without slime installed this module still imports, and the pure functions
(:func:`prompt_messages`, :func:`render_student_prompt`, :func:`keep_messages`,
:func:`add_messages_to_row`) work; only instantiating :class:`MessagesDataSource` needs slime.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Iterable, Mapping, MutableMapping
from pathlib import Path

from .errors import ConfigError, SampleError
from .teacher_view import validate_messages

DEFAULT_MESSAGES_KEY = "messages"


# --------------------------------------------------------------------------------------------------
# Pure functions


def prompt_messages(prompt, *, sample_id=None) -> list[dict]:
    """The chat messages of a row's prompt: a string becomes one user message (as slime does with
    ``--apply-chat-template``); a list of messages is validated and returned as is (multi-turn allowed).

    Raises:
        SampleError: the prompt is neither a string nor a list of ``{role, content}`` dicts.
    """
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return validate_messages(prompt, sample_id=sample_id, field="prompt")


def render_student_prompt(tokenizer, messages: list[dict], tools=None, chat_template_kwargs=None) -> str:
    """The student prompt slime builds with ``--apply-chat-template``: the student's chat template,
    with the generation prompt, as text (slime encodes it later without adding special tokens).

    Args:
        tokenizer: the student's Hugging Face tokenizer (``args.hf_checkpoint``).
        messages: the prompt messages.
        tools: tool schemas (slime reads them from the row's ``--tool-key`` column), or None.
        chat_template_kwargs: ``--apply-chat-template-kwargs`` (e.g. ``{"enable_thinking": False}``).
    """
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True, **dict(chat_template_kwargs or {})
    )


def set_path(metadata: MutableMapping, key: str, value) -> None:
    """Store ``value`` at ``key`` in ``metadata``; a dotted key ``"a.b"`` creates nested dicts."""
    parts = key.split(".")
    node = metadata
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, MutableMapping):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def keep_messages(
    samples: Iterable,
    *,
    key: str = DEFAULT_MESSAGES_KEY,
    tokenizer=None,
    chat_template_kwargs: Mapping | None = None,
) -> list:
    """Copy each sample's prompt messages into its metadata, then render its student prompt.

    Args:
        samples: objects with ``prompt`` (a string or a message list, as slime's loader leaves it without
            ``--apply-chat-template``) and ``metadata`` (dict); slime ``Sample`` objects or stand-ins.
        key: metadata key (dotted path allowed) that receives the messages.
        tokenizer: the student tokenizer. If given, ``prompt`` becomes the rendered student prompt string
            (``--apply-chat-template``), with ``metadata["tools"]`` as tools; if None, ``prompt`` stays as is.
        chat_template_kwargs: ``--apply-chat-template-kwargs``.

    Returns:
        The same samples (modified in place) as a list. Each gets a new metadata dict holding a deep copy
        of the messages, so later edits of the prompt do not reach the teacher's copy.
    """
    out = []
    for k, sample in enumerate(samples):
        sample_id = getattr(sample, "index", None)
        messages = prompt_messages(sample.prompt, sample_id=k if sample_id is None else sample_id)
        metadata = dict(sample.metadata or {})
        set_path(metadata, key, copy.deepcopy(messages))
        sample.metadata = metadata
        if tokenizer is not None:
            tools = metadata.get("tools")
            sample.prompt = render_student_prompt(tokenizer, messages, tools, chat_template_kwargs)
        out.append(sample)
    return out


def add_messages_to_row(
    row: Mapping,
    *,
    input_key: str = "input",
    metadata_key: str = "metadata",
    messages_key: str = DEFAULT_MESSAGES_KEY,
    row_number: int | None = None,
) -> dict:
    """A copy of a dataset row whose metadata column also holds the prompt messages.

    The prompt column is left unchanged, so slime renders the student prompt exactly as before.

    Raises:
        SampleError: the row has no usable prompt under ``input_key``.
    """
    if input_key not in row:
        raise SampleError(
            f"row {row_number}: no {input_key!r} column (columns: {sorted(row)}); pass --input-key"
        )
    messages = prompt_messages(row[input_key], sample_id=row_number)
    out = dict(row)
    metadata = out.get(metadata_key) or {}
    if isinstance(metadata, str):
        try:
            metadata = json.loads(metadata)
        except ValueError as e:
            raise SampleError(f"row {row_number}: the {metadata_key!r} column is a string but not JSON ({e})") from None
    if not isinstance(metadata, Mapping):
        kind = type(metadata).__name__
        raise SampleError(f"row {row_number}: the {metadata_key!r} column must be an object, got {kind}")
    metadata = copy.deepcopy(dict(metadata))
    set_path(metadata, messages_key, copy.deepcopy(messages))
    out[metadata_key] = metadata
    return out


# --------------------------------------------------------------------------------------------------
# The slime data source (slime imported lazily)


class MessagesDataSourceMixin:
    """Data-source behaviour on top of slime's ``RolloutDataSourceWithBuffer`` (see the module doc).

    slime's own ``Dataset`` reads the file (paths, slices, parquet, tools, metadata, multimodal keys), with
    template rendering and the long-prompt filter switched off; then every sample keeps its messages, the
    student prompt is rendered with slime's rule, slime's ``filter_long_prompt`` drops long prompts, and
    the dataset is shuffled as slime would have shuffled it.
    """

    def __init__(self, args) -> None:
        # getattr: slime's own contract tests build the class on an args object with only a few attributes
        # (no dataset flags); slime's base class then loads no dataset, and neither does this one.
        apply_template = bool(getattr(args, "apply_chat_template", False))
        inner = copy.copy(args)
        inner.apply_chat_template = False  # keep the message list; rendered below, after it is copied
        inner.rollout_max_prompt_len = None  # slime filters after rendering; so do we
        inner.rollout_shuffle = False  # shuffle once the final sample list exists
        if apply_template and getattr(args, "multimodal_keys", None) is None:
            # slime's loader turns a string prompt into a user message whenever multimodal_keys is not
            # None; an empty dict does that without any multimodal processing (keep_messages wraps too).
            inner.multimodal_keys = {}
        super().__init__(inner)
        self.args = args
        dataset = getattr(self, "dataset", None)
        if dataset is None:
            return
        from slime.utils.data import filter_long_prompt
        from slime.utils.processing_utils import load_processor, load_tokenizer

        tokenizer = load_tokenizer(args.hf_checkpoint, trust_remote_code=True)
        key = getattr(args, "xvocab_messages_key", None) or DEFAULT_MESSAGES_KEY
        samples = keep_messages(
            dataset.origin_samples,
            key=key,
            tokenizer=tokenizer if apply_template else None,
            chat_template_kwargs=getattr(args, "apply_chat_template_kwargs", None),
        )
        if args.rollout_max_prompt_len is not None and samples:
            processor = load_processor(args.hf_checkpoint, trust_remote_code=True)
            samples = filter_long_prompt(samples, tokenizer, processor, args.rollout_max_prompt_len)
        dataset.origin_samples = samples
        dataset.samples = samples
        dataset.epoch_id = -1
        if args.rollout_shuffle:
            dataset.shuffle(self.epoch_id)


def make_messages_data_source(base: type) -> type:
    """Build the data-source class on top of ``base`` (slime's ``RolloutDataSourceWithBuffer``)."""
    cls = type("MessagesDataSource", (MessagesDataSourceMixin, base), {"__module__": __name__})
    cls.__doc__ = MessagesDataSourceMixin.__doc__
    return cls


class _MessagesDataSourceWithoutSlime:
    """Placeholder used when slime is not importable: importing works, instantiating explains."""

    def __init__(self, *args, **kwargs) -> None:
        raise ConfigError(
            "slime_xvocab.data_source.MessagesDataSource needs slime (slime.rollout.data_source), which is "
            "not importable in this environment; run it inside a slime installation"
        )


_CLASS: type | None = None


def _messages_data_source() -> type:
    global _CLASS
    if _CLASS is None:
        try:
            from slime.rollout.data_source import RolloutDataSourceWithBuffer
        except ImportError:
            # Not cached: slime may become importable later (sys.path changes).
            return type("MessagesDataSource", (_MessagesDataSourceWithoutSlime,), {"__module__": __name__})
        _CLASS = make_messages_data_source(RolloutDataSourceWithBuffer)
    return _CLASS


def __getattr__(name: str):
    # PEP 562: `--data-source-path slime_xvocab.data_source.MessagesDataSource` resolves through getattr,
    # so slime is imported only when the class is asked for. Pickling finds the class the same way.
    if name == "MessagesDataSource":
        return _messages_data_source()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------------
# Row preprocessing CLI (eval datasets, or any dataset used without the custom data source)


def _read_rows(path: Path) -> list[tuple[str, dict]]:
    """``(where, row)`` for every row: ``where`` is ``"line N"`` (jsonl, 1-based file line) or ``"row N"``
    (parquet, 1-based). Raises SampleError naming the file and line for anything unreadable."""
    if not path.is_file():
        raise SampleError(f"{path}: no such file; pass an existing .jsonl or .parquet file to --in")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise SampleError(f"{path.name}: not a readable parquet file ({type(e).__name__}: {e})") from None
        return [(f"row {k}", row) for k, row in enumerate(rows, start=1)]
    out = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SampleError(
                    f"{path.name}: line {line_no} is not valid UTF-8 (byte {e.start}: {raw[e.start : e.start + 4]!r}); "
                    "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line.lstrip("\ufeff") if line_no == 1 else line)
            except json.JSONDecodeError as e:
                raise SampleError(
                    f"{path.name}: line {line_no} is not JSON ({e.msg} at column {e.colno}); expected one JSON "
                    "object per line"
                ) from None
            if not isinstance(row, dict):
                raise SampleError(f"{path.name}: line {line_no} is a JSON {type(row).__name__}, not an object (a row)")
            out.append((f"line {line_no}", row))
    return out


def _write_rows(path: Path, rows: list[dict]) -> None:
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
        return
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    """``python -m slime_xvocab.data_source --in rows.jsonl --out rows_with_messages.jsonl``."""
    parser = argparse.ArgumentParser(
        prog="python -m slime_xvocab.data_source",
        description="Copy each row's prompt messages into its metadata column (for eval datasets, or any "
        "dataset loaded without slime_xvocab.data_source.MessagesDataSource). "
        "Reads/writes .jsonl or .parquet.",
    )
    parser.add_argument("--in", dest="src", required=True, type=Path, help="input rows (.jsonl/.parquet)")
    parser.add_argument("--out", dest="dst", required=True, type=Path, help="output rows (.jsonl/.parquet)")
    parser.add_argument("--input-key", default="input", help="prompt column (slime's --input-key)")
    parser.add_argument("--metadata-key", default="metadata", help="metadata column (slime's --metadata-key)")
    parser.add_argument("--messages-key", default=DEFAULT_MESSAGES_KEY, help="xvocab_messages_key")
    ns = parser.parse_args(argv)
    try:
        out = []
        for k, (where, row) in enumerate(_read_rows(ns.src), start=1):
            try:
                out.append(
                    add_messages_to_row(
                        row,
                        input_key=ns.input_key,
                        metadata_key=ns.metadata_key,
                        messages_key=ns.messages_key,
                        row_number=k,
                    )
                )
            except (SampleError, ValueError, TypeError) as e:
                raise SampleError(f"{ns.src.name}, {where}: {e}") from None
    except SampleError as e:
        print(f"python -m slime_xvocab.data_source: {e}", file=sys.stderr)
        return 2
    _write_rows(ns.dst, out)
    print(f"wrote {len(out)} rows with metadata[{ns.messages_key!r}] to {ns.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
