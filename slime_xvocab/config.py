"""``XVocabConfig``: every setting of the plugin, read once from slime's ``args`` and validated.

Settings reach ``args`` in one of three ways, all with the same names:

* a ``--custom-config-path`` YAML file (slime does ``setattr(args, key, value)`` for every key)::

      xvocab_teacher_tokenizer: /models/Llama-3.1-70B-Instruct
      xvocab_teacher_urls: http://10.0.0.7:30000

* real ``--xvocab-*`` flags, when training is started through :mod:`slime_xvocab.train` (stock
  ``train.py`` silently drops flags it does not know);
* environment variables ``XVOCAB_<NAME>`` (``XVOCAB_TEACHER_URLS``, ``XVOCAB_API_KEY`` ...), which
  override both. Lists are comma-separated, dicts are JSON, booleans ``true``/``false``.

:meth:`XVocabConfig.from_args` checks everything at once and raises one :class:`ConfigError` listing every
problem (unknown ``xvocab_*`` keys with a did-you-mean, wrong types, bad choices, missing teacher tokenizer
or URL, slime flags that make OPD a no-op). ``python -m slime_xvocab.config`` prints the reference table
that ``docs/configuration.md`` embeds.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .credit import CHUNK_SPLITS, CREDIT_MODES, DEFAULT_TOP_K
from .dense import DEFAULT_DENSE_TOP_K, DIVERGENCES
from .errors import ConfigError
from .teacher_view import PROMPT_FORMATS, SYSTEM_PROMPT_POLICIES

__all__ = ["XVocabConfig", "fields_reference", "reference_markdown", "ARG_PREFIX", "ENV_PREFIX", "FALLBACKS"]

logger = logging.getLogger(__name__)

ARG_PREFIX = "xvocab_"
ENV_PREFIX = "XVOCAB_"
FALLBACKS = ("student", "error")
UNSCORED_POLICIES = ("keep", "mask")


def _opt(
    default: Any,
    help: str,
    kind: str,
    *,
    choices: tuple[str, ...] = (),
    minimum: float | None = None,
    factory: Any = None,
) -> Any:
    """A dataclass field whose metadata drives validation, env parsing, ``--xvocab-*`` flags and the docs."""
    meta = {"help": help, "kind": kind, "choices": choices, "minimum": minimum}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class XVocabConfig:
    """The plugin's settings. Build it with :meth:`from_args`; field ``name`` is ``args.xvocab_<name>``.

    ``kind`` in each field's metadata is one of ``str``, ``opt_str``, ``urls``, ``choice``, ``dict``,
    ``int``, ``opt_int``, ``float``, ``bool``.
    """

    teacher_tokenizer: str | None = _opt(
        None,
        "Teacher tokenizer: a Hugging Face path or hub id. Must be the tokenizer the teacher server runs "
        "(its chat template renders the teacher's prompt). Required.",
        "opt_str",
    )
    teacher_urls: tuple[str, ...] = _opt(
        (),
        "Teacher endpoint(s): one URL, a list (requests go round-robin with failover), or one "
        "sglang-router URL. `http://host:port` or `.../generate`. Defaults to slime's `--rm-url` so "
        "switching from slime's own OPD hooks needs no new key. Required.",
        "urls",
    )
    student_tokenizer: str | None = _opt(
        None,
        "Student tokenizer path; defaults to slime's `--hf-checkpoint` (what slime itself loads).",
        "opt_str",
    )
    api_key: str | None = _opt(
        None,
        "Sent as `Authorization: Bearer <key>` (SGLang `--api-key`). Prefer the XVOCAB_API_KEY environment "
        "variable to keep it out of files; never logged.",
        "opt_str",
    )
    credit_mode: str = _opt(
        "student_token",
        "What each student token gets. `student_token`: the teacher's probability of that student token (its "
        "bytes, and the student not writing a longer token there), read from the teacher's top-k "
        "(xvocab_top_k) at each position; the value slime's OPD needs to converge to the teacher. `chunk`: "
        "every aligned chunk passes the teacher's log-mass to its student tokens (xvocab_chunk_split); "
        "`exact`: only 1:1 chunks get a teacher value. Elsewhere a token keeps the student's log-prob "
        "(delta 0). See docs/alignment.md.",
        "choice",
        choices=CREDIT_MODES,
    )
    chunk_split: str = _opt(
        "uniform",
        "With credit_mode=chunk, how a chunk's teacher log-mass is split over its student tokens: `uniform` "
        "(equal shares of the chunk's teacher-minus-student delta) or `proportional` (shares in proportion to "
        "each token's own log-prob). (`prefix`, the old default, became credit_mode=student_token.)",
        "choice",
        choices=CHUNK_SPLITS,
    )
    top_k: int = _opt(
        DEFAULT_TOP_K,
        "Teacher top-k log-probs fetched per position for credit_mode=student_token (SGLang "
        "`top_logprobs_num`). Larger k sees more of a diffuse teacher's distribution; the answer grows by "
        "about 22 bytes per candidate and position. rollout/xvocab/top_k_mass reports the mass it covered.",
        "int",
        minimum=1,
    )
    dense: bool = _opt(
        False,
        "Dense distillation: also keep, per response position, the teacher's distribution over the student's "
        "next token (its top-k projected onto the student's vocabulary, plus a tail bucket) and send it to the "
        "training side for `slime_xvocab.dense_loss.dense_distill_loss`. Needs the runtime extension of "
        "`slime_xvocab.dense_transport` (docs/dense.md).",
        "bool",
    )
    dense_top_k: int = _opt(
        DEFAULT_DENSE_TOP_K,
        "Student tokens kept per position in the dense targets; the rest of the projected mass joins the tail "
        "bucket. At most xvocab_top_k are ever listed (the teacher's own top-k).",
        "int",
        minimum=1,
    )
    dense_coef: float = _opt(
        1.0,
        "Weight of the dense divergence added to slime's policy loss.",
        "float",
        minimum=0.0,
    )
    dense_divergence: str = _opt(
        "reverse_kl",
        "Divergence between the student's and the teacher's next-token distributions over the listed tokens "
        "plus the tail: `reverse_kl` (KL(student || teacher), mode-seeking), `forward_kl` or `jsd`.",
        "choice",
        choices=DIVERGENCES,
    )
    prompt_format: str = _opt(
        "chat",
        "`chat`: render the messages with the teacher's chat template; `completion`: base teachers "
        "without a chat template get the message contents as plain text, one paragraph each.",
        "choice",
        choices=PROMPT_FORMATS,
    )
    template_kwargs: dict = _opt(
        None,
        "Extra keyword arguments for the teacher's `apply_chat_template` (e.g. "
        "`{enable_thinking: false}` for a Qwen3 teacher). slime's `--apply-chat-template-kwargs` only "
        "reach the student.",
        "dict",
        factory=dict,
    )
    system_prompt: str = _opt(
        "keep",
        "`keep` the conversation's system message in the teacher's prompt; `drop` it (teachers whose "
        "template rejects a system role); `teacher_default` drops it so the teacher template writes its "
        "own default system prompt (Llama-3.1's date header).",
        "choice",
        choices=SYSTEM_PROMPT_POLICIES,
    )
    end_of_turn: str | None = _opt(
        None,
        "The teacher's end-of-turn token as text (e.g. `<|eot_id|>`); default: read from the teacher's chat "
        "template. The student's end of turn is scored as this token. A base teacher never learned its chat "
        "template's turn end: use its EOS (e.g. `<eos>`), or `unscored` to leave the end of turn unscored (delta 0).",
        "opt_str",
    )
    student_end_of_turn: str | None = _opt(
        None,
        "The student's end-of-turn token(s) as text, comma-separated; default: read from the student's "
        "chat template and EOS ids.",
        "opt_str",
    )
    messages_key: str = _opt(
        "messages",
        "Key of `sample.metadata` holding the raw chat messages (put there by the dataset's metadata column "
        "or by `slime_xvocab.data_source.MessagesDataSource`). If absent and `sample.prompt` is a message "
        "list, that list is used.",
        "str",
    )
    tools_key: str = _opt(
        "tools",
        "Key of `sample.metadata` holding tool schemas for the teacher template (slime's `--tool-key`).",
        "str",
    )
    max_teacher_tokens: int | None = _opt(
        None,
        "Teacher context limit in tokens (prompt + response). Longer teacher views are cut; the student "
        "tokens past the cut keep their own log-prob (counted as unaligned/teacher_context). None: no limit.",
        "opt_int",
        minimum=2,
    )
    timeout_s: float = _opt(
        120.0, "Per-attempt HTTP timeout for one teacher request, seconds.", "float", minimum=1e-3
    )
    max_retries: int = _opt(
        3, "Retries after the first attempt (connection errors, timeouts, 5xx, 408, 429).", "int", minimum=0
    )
    max_concurrency: int = _opt(
        32,
        "Teacher requests in flight at once from the rollout process (slime runs reward functions outside "
        "its own generation semaphore, so this is the only limit).",
        "int",
        minimum=1,
    )
    fallback: str = _opt(
        "student",
        "When a sample cannot be scored (teacher down after retries, unreadable sample): `student` gives "
        "it the student's own log-probs (OPD delta 0, counted in rollout/xvocab/fallback_samples); `error` "
        "stops training at once.",
        "choice",
        choices=FALLBACKS,
    )
    unscored: str = _opt(
        "keep",
        "What happens to response tokens without a teacher value (unaligned, not 1:1 in exact mode, or a "
        "sample that fell back): `keep` trains them with OPD delta 0; `mask` also sets their `loss_mask` to 0. "
        "With slime's `--normalize-advantages` a delta of 0 is not neutral (whitening turns it into +mean "
        "reverse KL / std, pushing those tokens up); `mask` keeps them out of the loss and of the whitening "
        "statistics, at the price of any task-reward gradient there.",
        "choice",
        choices=UNSCORED_POLICIES,
    )
    max_failed_fraction: float = _opt(
        0.1,
        "With fallback=student, stop with an error when more than this fraction of a rollout's samples "
        "fell back (a dead teacher should not silently turn OPD off). 1.0 never stops.",
        "float",
        minimum=0.0,
    )
    inner_rm_type: str | None = _opt(
        None,
        "Also compute a task reward with slime's rule-based reward of this type (`math`, `dapo`, "
        "`deepscaler`, `f1`, `gpqa`, `remote_rm` ...; slime's `--rm-type` values). The reward hook returns "
        "it, so RL and OPD combine. None: pure distillation (reward 0.0).",
        "opt_str",
    )
    inner_rm_path: str | None = _opt(
        None,
        "Like inner_rm_type, with your own reward function by dotted path "
        "(`async def rm(args, sample, **kwargs)`, slime's --custom-rm-path contract).",
        "opt_str",
    )
    trust_remote_code: bool = _opt(
        True, "Passed to `AutoTokenizer.from_pretrained` for both tokenizers (slime loads with True).", "bool"
    )

    # ------------------------------------------------------------------------------------------ build

    @classmethod
    def from_args(
        cls, args: Any, *, environ: Mapping[str, str] | None = None, warn: bool = True
    ) -> XVocabConfig:
        """Read and validate the ``xvocab_*`` settings on slime's ``args`` (plus ``XVOCAB_*`` env vars).

        Args:
            args: slime's ``argparse.Namespace`` (any object with attributes works). Attributes that are
                ``None`` count as unset (``--xvocab-*`` flags default to ``None``).
            environ: environment to read overrides from (default ``os.environ``).
            warn: emit warnings for settings that are allowed but probably wrong.

        Returns:
            The validated, frozen config.

        Raises:
            ConfigError: one error listing every problem found, one per line, each with its fix.
        """
        environ = os.environ if environ is None else environ
        problems: list[str] = []
        raw: dict[str, tuple[Any, str]] = {}  # name -> (value, where it came from)
        attrs = vars(args) if hasattr(args, "__dict__") else {}
        for key, value in attrs.items():
            if not key.startswith(ARG_PREFIX):
                continue
            name = key[len(ARG_PREFIX) :]
            if name not in _FIELDS:
                problems.append(f"unknown key {key!r}{_did_you_mean(key, [ARG_PREFIX + n for n in _FIELDS])}")
            elif value is not None:
                raw[name] = (value, key)
        for key, text in environ.items():
            if not key.startswith(ENV_PREFIX):
                continue
            name = key[len(ENV_PREFIX) :].lower()
            if name not in _FIELDS:
                options = [ENV_PREFIX + n.upper() for n in _FIELDS]
                problems.append(f"unknown environment variable {key!r}{_did_you_mean(key, options)}")
                continue
            try:
                raw[name] = (_parse_env(text, _FIELDS[name].metadata["kind"]), f"{key} (environment)")
            except ValueError as exc:
                problems.append(f"{key} (environment) = {text!r}: {exc}")

        values: dict[str, Any] = {}
        for name, (value, where) in raw.items():
            if value is None:  # an environment "none" unsets the key: its default applies
                continue
            try:
                values[name] = _coerce(value, _FIELDS[name].metadata)
            except ValueError as exc:
                problems.append(f"{where} = {value!r}: {exc}")

        if "teacher_urls" not in raw and getattr(args, "rm_url", None):
            values["teacher_urls"] = _coerce(args.rm_url, _FIELDS["teacher_urls"].metadata)
        if "student_tokenizer" not in raw and getattr(args, "hf_checkpoint", None):
            values["student_tokenizer"] = str(args.hf_checkpoint)
        problems += _check_required(values)
        problems += _check_combinations(values, args)
        if problems:
            raise ConfigError(
                f"slime-xvocab configuration has {len(problems)} problem(s):\n"
                + "\n".join(f"  - {p}" for p in problems)
                + "\nSettings come from the --custom-config-path YAML (xvocab_* keys), --xvocab-* flags "
                "of `python -m slime_xvocab.train`, or XVOCAB_* environment variables; see "
                "docs/configuration.md."
            )
        config = cls(**values)
        if warn:
            for message in _warnings(config, args):
                warnings.warn(message, stacklevel=2)
                logger.warning(message)
        return config

    def to_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """Plain dict of every setting (for run logs); the API key reads ``"***"`` unless ``redact=False``."""
        out = dataclasses.asdict(self)
        out["teacher_urls"] = list(self.teacher_urls)
        if redact and out.get("api_key"):
            out["api_key"] = "***"
        return out

    def __repr__(self) -> str:
        body = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"XVocabConfig({body})"


_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(XVocabConfig)}


# ---------------------------------------------------------------------------------------------- checks


def _did_you_mean(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    return (
        f" (did you mean {close[0]!r}?)"
        if close
        else " (not a slime-xvocab setting; see docs/configuration.md)"
    )


def _parse_env(text: str, kind: str) -> Any:
    """Turn an environment string into the value a YAML file would have given."""
    text = text.strip()
    if kind in ("opt_str", "opt_int") and text.lower() in ("", "none", "null"):
        return None
    if kind == "urls":
        return [u.strip() for u in text.split(",") if u.strip()]
    if kind == "dict":
        try:
            return json.loads(text) if text else {}
        except ValueError as exc:
            raise ValueError(f"must be a JSON object ({exc})") from None
    if kind == "bool":
        return _parse_bool(text)
    if kind in ("int", "opt_int"):
        try:
            return int(text)
        except ValueError:
            raise ValueError("must be an integer") from None
    if kind == "float":
        try:
            return float(text)
        except ValueError:
            raise ValueError("must be a number") from None
    return text


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _coerce(value: Any, meta: Mapping[str, Any]) -> Any:
    """Check one value against its field's kind, choices and minimum; return it in canonical form."""
    kind = meta["kind"]
    if kind in ("str", "opt_str", "choice"):
        if not isinstance(value, str) or (kind != "opt_str" and not value):
            raise ValueError(f"must be a non-empty string, got {type(value).__name__}")
        if kind == "choice" and value == "prefix" and "proportional" in meta["choices"]:
            raise ValueError(
                "'prefix' was replaced by xvocab_credit_mode: student_token (the default, which values each "
                "student token with the teacher's probability of that token); remove xvocab_chunk_split"
            )
        if kind == "choice" and value not in meta["choices"]:
            close = difflib.get_close_matches(value, meta["choices"], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"must be one of {', '.join(meta['choices'])}{hint}")
        return value or None
    if kind == "urls":
        items = [u.strip() for u in value.split(",")] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(u, str) for u in items):
            raise ValueError("must be a URL or a list of URLs")
        items = [u.strip() for u in items if u.strip()]
        bad = [u for u in items if not u.startswith(("http://", "https://"))]
        if bad:
            raise ValueError(f"{bad[0]!r} must start with http:// or https:// (e.g. http://127.0.0.1:30000)")
        return tuple(items)
    if kind == "dict":
        if not isinstance(value, dict):
            raise ValueError(f"must be a mapping (YAML dict / JSON object), got {type(value).__name__}")
        return dict(value)
    if kind == "bool":
        if isinstance(value, str):
            return _parse_bool(value)
        if not isinstance(value, bool):
            raise ValueError(f"must be true or false, got {type(value).__name__}")
        return value
    if kind in ("int", "opt_int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {type(value).__name__}")
    elif kind == "float":
        if isinstance(value, str):  # YAML reads 1e-3 without a dot as a string
            try:
                value = float(value)
            except ValueError:
                raise ValueError("must be a number (write floats with a dot, e.g. 1.0e-3)") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, got {type(value).__name__}")
        value = float(value)
    if meta["minimum"] is not None and value < meta["minimum"]:
        raise ValueError(f"must be >= {meta['minimum']}")
    return value


def _check_required(values: Mapping[str, Any]) -> list[str]:
    problems = []
    if not values.get("teacher_tokenizer"):
        problems.append(
            "xvocab_teacher_tokenizer is not set: give the teacher's tokenizer (the path the teacher server "
            "was launched with, e.g. /models/Llama-3.1-70B-Instruct)"
        )
    if not values.get("teacher_urls"):
        problems.append(
            "xvocab_teacher_urls is not set (nor slime's --rm-url): give the teacher server's URL, e.g. "
            "http://10.0.0.7:30000 (see scripts/launch_teacher.sh)"
        )
    if not values.get("student_tokenizer"):
        problems.append("no student tokenizer: set slime's --hf-checkpoint or xvocab_student_tokenizer")
    return problems


def _check_combinations(values: Mapping[str, Any], args: Any) -> list[str]:
    problems = []
    if values.get("inner_rm_type") and values.get("inner_rm_path"):
        problems.append("xvocab_inner_rm_type and xvocab_inner_rm_path are both set: keep one")
    if values.get("max_failed_fraction", 0.0) > 1.0:
        problems.append("xvocab_max_failed_fraction must be <= 1.0 (1.0 = never stop)")
    path = values.get("inner_rm_path")
    if path and path.rpartition(".")[0] == "":
        problems.append(f"xvocab_inner_rm_path={path!r} must be a dotted path `package.module.function`")
    if path and path.startswith("slime_xvocab.hooks."):
        problems.append("xvocab_inner_rm_path points at slime_xvocab's own reward hook (infinite recursion)")
    if getattr(args, "use_opd", None) is False and not values.get("dense"):
        problems.append(
            "slime's --use-opd is not set, so teacher_log_probs would be computed and then ignored. Add "
            "`--use-opd --opd-type sglang --opd-kl-coef 1.0` to the slime command line"
        )
    opd_type = getattr(args, "opd_type", None)
    if getattr(args, "use_opd", False) and opd_type not in (None, "sglang"):
        problems.append(
            f"--opd-type is {opd_type!r}; slime-xvocab supplies teacher log-probs during rollout, which is "
            "--opd-type sglang (megatron OPD needs a same-architecture teacher)"
        )
    return problems


def _warnings(config: XVocabConfig, args: Any) -> list[str]:
    out = []
    temperature = getattr(args, "rollout_temperature", None)
    if temperature is not None and float(temperature) != 1.0:
        out.append(
            f"--rollout-temperature is {temperature}, but SGLang returns teacher input log-probs at "
            "temperature 1 while slime divides the student's logits by the rollout temperature, so the OPD "
            "delta compares different temperatures. Use --rollout-temperature 1."
        )
    post = getattr(args, "custom_reward_post_process_path", None)
    if hasattr(args, "custom_reward_post_process_path") and post != "slime_xvocab.hooks.post_process_rewards":
        out.append(
            f"--custom-reward-post-process-path is {post!r}, not slime_xvocab.hooks.post_process_rewards: "
            "xvocab_max_failed_fraction is not enforced and samples the reward hook skipped get no "
            "teacher_log_probs"
        )
    if config.credit_mode != "chunk" and config.chunk_split != "uniform":
        out.append(f"xvocab_chunk_split has no effect with xvocab_credit_mode={config.credit_mode}")
    return out


# ---------------------------------------------------------------------------------------------- reference


def fields_reference() -> list[dict[str, Any]]:
    """One entry per setting, in declaration order: the source of ``--xvocab-*`` flags and the docs table.

    Returns:
        Dicts with ``name`` (field), ``key`` (``xvocab_<name>``), ``flag`` (``--xvocab-<name>``), ``env``
        (``XVOCAB_<NAME>``), ``kind``, ``choices``, ``minimum``, ``default`` and ``help``.
    """
    out = []
    for f in dataclasses.fields(XVocabConfig):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
        out.append(
            {
                "name": f.name,
                "key": ARG_PREFIX + f.name,
                "flag": "--" + (ARG_PREFIX + f.name).replace("_", "-"),
                "env": ENV_PREFIX + f.name.upper(),
                "kind": f.metadata["kind"],
                "choices": f.metadata["choices"],
                "minimum": f.metadata["minimum"],
                "default": default,
                "help": f.metadata["help"],
            }
        )
    return out


_KIND_NAMES = {
    "str": "string",
    "opt_str": "string",
    "urls": "URL or list of URLs",
    "choice": "one of",
    "dict": "mapping",
    "int": "integer",
    "opt_int": "integer",
    "float": "number",
    "bool": "boolean",
}


def _format_default(entry: Mapping[str, Any]) -> str:
    default = entry["default"]
    if entry["name"] == "student_tokenizer":
        return "`--hf-checkpoint`"
    if entry["name"] == "teacher_urls":
        return "`--rm-url`"
    if default is None or default == ():
        return "—"
    if isinstance(default, dict):
        return "`{}`" if not default else f"`{json.dumps(default)}`"
    return f"`{str(default).lower() if isinstance(default, bool) else default}`"


def reference_markdown() -> str:
    """The configuration reference table (markdown) embedded in ``docs/configuration.md``."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for e in fields_reference():
        kind = _KIND_NAMES[e["kind"]]
        if e["choices"]:
            kind = " \\| ".join(f"`{c}`" for c in e["choices"])
        if e["minimum"] is not None:
            kind += f", ≥ {e['minimum']:g}"
        meaning = e["help"].replace("|", "\\|")  # a pipe, even inside backticks, would end the cell
        lines.append(f"| `{e['key']}` | {kind} | {_format_default(e)} | {meaning} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(reference_markdown())
