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
import re
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .credit import CHUNK_SPLITS, CREDIT_MODES, DEFAULT_TOP_K
from .dense import DEFAULT_DENSE_TOP_K, DIVERGENCES
from .errors import ConfigError
from .routing import Route, normalise_route
from .teacher_view import PROMPT_FORMATS, SYSTEM_PROMPT_POLICIES
from .urls import check_url, has_credentials, is_loopback, redact_url

__all__ = [
    "XVocabConfig",
    "TeacherConfig",
    "TEACHER_ENTRY_KEYS",
    "TEACHER_OVERRIDES",
    "fields_reference",
    "reference_markdown",
    "ARG_PREFIX",
    "ENV_PREFIX",
    "FALLBACKS",
    "API_KEY_ENV",
    "OLD_API_KEY_ENV",
]

logger = logging.getLogger(__name__)

ARG_PREFIX = "xvocab_"
ENV_PREFIX = "XVOCAB_"
FALLBACKS = ("student", "error")
UNSCORED_POLICIES = ("keep", "mask")
#: The one environment variable for the teacher API key (hooks, ``check``, ``serve-teacher``).
API_KEY_ENV = "XVOCAB_API_KEY"
#: Its old name (read by ``check`` before 0.2); still accepted, with a deprecation warning.
OLD_API_KEY_ENV = "SLIME_XVOCAB_TEACHER_API_KEY"
#: Settings whose values are never printed (logs, errors, ``to_dict``).
SECRET_FIELDS = frozenset({"api_key"})


#: Name of the one teacher that the single-teacher keys (xvocab_teacher_tokenizer / xvocab_teacher_urls) describe.
DEFAULT_TEACHER_NAME = "default"
#: Top-level settings an ``xvocab_teachers`` entry may override for its teacher (same names, same checks).
TEACHER_OVERRIDES = (
    "prompt_format",
    "template_kwargs",
    "system_prompt",
    "end_of_turn",
    "max_teacher_tokens",
    "top_k",
    "timeout_s",
    "retry_budget_s",
    "max_retries",
    "max_concurrency",
    "max_failed_fraction",
    "ca_bundle",
    "verify_tls",
)
#: Every key an ``xvocab_teachers`` entry accepts.
TEACHER_ENTRY_KEYS = ("name", "tokenizer", "urls", "api_key", "api_key_env", *TEACHER_OVERRIDES)
_TEACHER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class TeacherConfig:
    """One teacher: its tokenizer, endpoints, credentials and the settings it overrides.

    Built by :meth:`XVocabConfig.from_args` from an ``xvocab_teachers`` entry (settings it leaves out take the
    top-level ``xvocab_*`` value) or, without ``xvocab_teachers``, from the single-teacher keys as the one
    teacher named ``default``. ``api_key`` is resolved already (``api_key_env`` read at start-up).
    """

    name: str
    tokenizer: str
    urls: tuple[str, ...]
    api_key: str | None = None
    prompt_format: str = "chat"
    template_kwargs: dict = field(default_factory=dict)
    system_prompt: str = "keep"
    end_of_turn: str | None = None
    max_teacher_tokens: int | None = None
    top_k: int = DEFAULT_TOP_K
    timeout_s: float = 120.0
    retry_budget_s: float = 60.0
    max_retries: int | None = None
    max_concurrency: int = 32
    max_failed_fraction: float = 0.1
    ca_bundle: str | None = None
    verify_tls: bool = True

    def to_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """Plain dict; unless ``redact=False`` the API key reads ``"***"`` and URL credentials ``***@``."""
        out = dataclasses.asdict(self)
        out["urls"] = [redact_url(u) if redact else u for u in self.urls]
        if redact and out.get("api_key"):
            out["api_key"] = "***"
        return out

    def __repr__(self) -> str:
        return f"TeacherConfig({', '.join(f'{k}={v!r}' for k, v in self.to_dict().items())})"


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
    ``int``, ``opt_int``, ``float``, ``opt_float``, ``bool``, ``teachers``, ``route``.

    After :meth:`from_args`, ``teachers`` always holds at least one :class:`TeacherConfig` (the single-teacher
    keys become the teacher ``default``), ``teacher_routes`` maps each value to a normalised
    :data:`~slime_xvocab.routing.Route` and ``default_teacher`` is a route.
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
        "variable (the hooks and `check` read it; the old SLIME_XVOCAB_TEACHER_API_KEY still works, with a "
        "deprecation warning): slime prints YAML keys with its arguments. Never logged by the plugin.",
        "opt_str",
    )
    teachers: tuple = _opt(
        (),
        "Several teachers (docs/multi-teacher.md): a list of entries, each with `name` (letters, digits, `_.-`), "
        "`tokenizer`, `urls` (list or router URL), optionally `api_key_env` (the name of the environment variable "
        "holding its key; or `api_key`) and any of `prompt_format`, `template_kwargs`, `system_prompt`, "
        "`end_of_turn`, `max_teacher_tokens`, `top_k`, `timeout_s`, `retry_budget_s`, `max_retries`, "
        "`max_concurrency`, `max_failed_fraction`, `ca_bundle`, `verify_tls` (default: the top-level setting). "
        "Replaces xvocab_teacher_tokenizer / xvocab_teacher_urls, which describe one teacher named `default`. "
        "The top-level API key is not given to listed teachers.",
        "teachers",
    )
    teacher_route_key: str | None = _opt(
        None,
        "Key of `sample.metadata` whose value picks the teacher(s) of a sample through xvocab_teacher_routes "
        "(e.g. `source` or `domain`, written by the data source). None: every sample goes to "
        "xvocab_default_teacher.",
        "opt_str",
    )
    teacher_routes: dict = _opt(
        None,
        "Route of each value of the xvocab_teacher_route_key field: a teacher name, or `{name: weight}` for the "
        "token-level mixture of several teachers (weights normalised; log sum_k w_k p_k(token) per student "
        "token, over the teachers that scored it). Values without a route go to xvocab_default_teacher "
        "(counted in rollout/xvocab/unrouted_samples).",
        "dict",
        factory=dict,
    )
    default_teacher: Any = _opt(
        None,
        "Teacher (or `{name: weight}` mixture) of samples without a route; default: the first teacher.",
        "route",
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
        "about 33 bytes per candidate and position and the client's CPU in proportion "
        "(docs/teacher-server.md). rollout/xvocab/top_k_mass reports the mass it covered.",
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
    retry_budget_s: float = _opt(
        60.0,
        "How long a teacher request keeps being retried after its first failure (connection errors, timeouts, "
        "5xx, 408, 429), seconds: exponential backoff with full jitter (at most 8 s per sleep), longer when "
        "the server sends Retry-After. The default rides through a router failover or a replica restart; 0 "
        "disables retries.",
        "float",
        minimum=0.0,
    )
    max_retries: int | None = _opt(
        None,
        "Optional cap on retries per teacher request, on top of xvocab_retry_budget_s (which alone bounds "
        "them by default). Deprecated as the main knob: set xvocab_retry_budget_s.",
        "opt_int",
        minimum=0,
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
        "sample that fell back): `keep` gives them the student's rollout log-prob, an OPD delta of exactly 0 with "
        "slime's `--use-rollout-logprobs` (by default slime recomputes the student's log-probs in Megatron, and "
        "the delta there is the train/inference mismatch); `mask` also sets their `loss_mask` to 0. With slime's "
        "`--normalize-advantages` a delta of 0 is not neutral (whitening turns it into +mean reverse KL / std, "
        "pushing those tokens up); `mask` keeps them out of the loss and of the whitening statistics, at the "
        "price of any task-reward gradient there. Measured in docs/how-it-fits.md.",
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
    teacher_temperature: float | None = _opt(
        None,
        "Temperature T of the teacher's log-probs, log softmax(z / T), sent as SGLang's "
        "`input_logprob_temperature` (sglang#36213, slime#2325) when T != 1. Default: slime's "
        "`--rollout-temperature`, so OPD compares student and teacher at the same temperature. A server "
        "without that option ignores it and answers at T = 1; the plugin reads the temperature the server "
        "echoes in its first answer and warns once when it differs (training goes on at T = 1).",
        "opt_float",
        minimum=1e-6,
    )
    ca_bundle: str | None = _opt(
        None,
        "PEM file of the CA(s) that sign an https teacher's certificate (a private CA). Default: the system "
        "store (and SSL_CERT_FILE).",
        "opt_str",
    )
    verify_tls: bool = _opt(
        True, "Verify the certificate of an https teacher. false is for testing only (warns).", "bool"
    )
    startup_probe: bool = _opt(
        True,
        "On the first reward call, check once per process that the teacher answers /health_generate and that "
        "its vocabulary and context length fit the teacher tokenizer and xvocab_max_teacher_tokens; stop with "
        "one clear error otherwise (instead of a rollout of fallbacks).",
        "bool",
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
        if environ.get(OLD_API_KEY_ENV) and not environ.get(API_KEY_ENV) and "api_key" not in raw:
            message = f"{OLD_API_KEY_ENV} is deprecated: set {API_KEY_ENV} (read by the hooks and `check` alike)"
            warnings.warn(message, DeprecationWarning, stacklevel=2)
            logger.warning(message)
            raw["api_key"] = (environ[OLD_API_KEY_ENV], f"{OLD_API_KEY_ENV} (environment)")
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
                problems.append(f"{key} (environment) = {_shown(name, text)}: {exc}")

        values: dict[str, Any] = {}
        for name, (value, where) in raw.items():
            if value is None:  # an environment "none" unsets the key: its default applies
                continue
            try:
                values[name] = _coerce(value, _FIELDS[name].metadata)
            except ValueError as exc:
                problems.append(f"{where} = {_shown(name, value)}: {exc}")

        if "teacher_urls" not in raw and not values.get("teachers") and getattr(args, "rm_url", None):
            values["teacher_urls"] = _coerce(args.rm_url, _FIELDS["teacher_urls"].metadata)
        rollout_t = getattr(args, "rollout_temperature", None)
        if "teacher_temperature" not in values and isinstance(rollout_t, (int, float)) and rollout_t > 0:
            values["teacher_temperature"] = float(rollout_t)  # as slime's own OPD (#2085, #2325)
        if "student_tokenizer" not in raw and getattr(args, "hf_checkpoint", None):
            values["student_tokenizer"] = str(args.hf_checkpoint)
        teachers, teacher_problems, teacher_warnings = _build_teachers(values, environ)
        problems += _check_required(values)
        problems += teacher_problems
        if teachers:
            values["teacher_routes"], values["default_teacher"], route_problems = _build_routes(values, teachers)
            problems += route_problems
        problems += _check_combinations(values, args, teachers)
        problems += _check_transport(values, teachers)
        if problems:
            raise ConfigError(
                f"slime-xvocab configuration has {len(problems)} problem(s):\n"
                + "\n".join(f"  - {p}" for p in problems)
                + "\nSettings come from the --custom-config-path YAML (xvocab_* keys), --xvocab-* flags "
                "of `python -m slime_xvocab.train`, or XVOCAB_* environment variables; see "
                "docs/configuration.md."
            )
        values["teachers"] = teachers
        config = cls(**values)
        if warn:
            from_args = "api_key" in raw and raw["api_key"][1] == ARG_PREFIX + "api_key"
            found = _warnings(config, args) + _transport_warnings(config, key_from_args=from_args) + teacher_warnings
            for message in found:
                warnings.warn(message, stacklevel=2)
                logger.warning(message)
        return config

    def to_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """Plain dict of every setting (for run logs). Unless ``redact=False`` the API key reads ``"***"`` and
        URL credentials ``***@``."""
        out = dataclasses.asdict(self)
        out["teacher_urls"] = list(self.teacher_urls)
        out["teachers"] = [t.to_dict(redact=redact) for t in self.teachers]
        if redact:
            out["teacher_urls"] = [redact_url(u) for u in self.teacher_urls]
            for name in SECRET_FIELDS:
                if out.get(name):
                    out[name] = "***"
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


def _shown(name: str, value: Any) -> str:
    """How a rejected value appears in a ConfigError: secrets never, URLs without credentials."""
    if name in SECRET_FIELDS:
        return f"<redacted {type(value).__name__}>"
    return redact_url(repr(value))


def _parse_env(text: str, kind: str) -> Any:
    """Turn an environment string into the value a YAML file would have given."""
    text = text.strip()
    if kind in ("opt_str", "opt_int", "opt_float", "route") and text.lower() in ("", "none", "null"):
        return None
    if kind == "teachers" or (kind == "route" and text.startswith("{")):
        try:
            return json.loads(text)
        except ValueError as exc:
            raise ValueError(f"must be JSON ({exc})") from None
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
    if kind in ("float", "opt_float"):
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
        for u in items:
            problem = check_url(u)
            if problem is not None:
                raise ValueError(problem)
        return tuple(items)
    if kind == "teachers":
        if not isinstance(value, (list, tuple)) or not all(isinstance(t, Mapping) for t in value):
            raise ValueError("must be a list of teacher entries (YAML list of mappings / JSON array of objects)")
        return tuple(dict(t) for t in value)
    if kind == "route":
        if not isinstance(value, (str, Mapping)) or not value:
            raise ValueError("must be a teacher name or a mapping {teacher name: weight}")
        return value if isinstance(value, str) else dict(value)
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
    elif kind in ("float", "opt_float"):
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
    if values.get("teachers"):
        for key in ("teacher_tokenizer", "teacher_urls"):
            if values.get(key):
                problems.append(
                    f"xvocab_teachers and {ARG_PREFIX + key} are both set: give every teacher its tokenizer and "
                    "urls in its xvocab_teachers entry (the single-teacher keys describe one teacher)"
                )
    elif not values.get("teacher_tokenizer"):
        problems.append(
            "xvocab_teacher_tokenizer is not set: give the teacher's tokenizer (the path the teacher server "
            "was launched with, e.g. /models/Llama-3.1-70B-Instruct)"
        )
    if not values.get("teacher_urls") and not values.get("teachers"):
        problems.append(
            "xvocab_teacher_urls is not set (nor slime's --rm-url): give the teacher server's URL, e.g. "
            "http://10.0.0.7:30000 (see scripts/launch_teacher.sh)"
        )
    if not values.get("student_tokenizer"):
        problems.append("no student tokenizer: set slime's --hf-checkpoint or xvocab_student_tokenizer")
    return problems


def _check_combinations(values: Mapping[str, Any], args: Any, teachers: tuple[TeacherConfig, ...] = ()) -> list[str]:
    problems = []
    if values.get("dense") and len(teachers) > 1:
        problems.append(
            f"xvocab_dense takes one teacher; {len(teachers)} are configured in xvocab_teachers. Dense targets are "
            "not combined across teachers yet: use sampled-token OPD (the default) for several teachers"
        )
    if values.get("inner_rm_type") and values.get("inner_rm_path"):
        problems.append("xvocab_inner_rm_type and xvocab_inner_rm_path are both set: keep one")
    if values.get("max_failed_fraction", 0.0) > 1.0:
        problems.append("xvocab_max_failed_fraction must be <= 1.0 (1.0 = never stop)")
    path = values.get("inner_rm_path")
    if path and path.rpartition(".")[0] == "":
        problems.append(f"xvocab_inner_rm_path={path!r} must be a dotted path `package.module.function`")
    if path and path.startswith("slime_xvocab.hooks."):
        problems.append("xvocab_inner_rm_path points at slime_xvocab's own reward hook (infinite recursion)")
    rm_url = getattr(args, "rm_url", None)
    if values.get("inner_rm_type") == "remote_rm" and rm_url:
        rm_urls = {u.strip() for u in (rm_url.split(",") if isinstance(rm_url, str) else rm_url)}
        if rm_urls & ({u for t in teachers for u in t.urls} | set(values.get("teacher_urls", ()))):
            problems.append(
                f"xvocab_inner_rm_type is remote_rm, which posts rewards to --rm-url, but --rm-url "
                f"({rm_url}) is also the teacher URL (xvocab_teacher_urls defaults to --rm-url): set "
                "xvocab_teacher_urls to the teacher server and keep --rm-url for the reward server"
            )
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


def _check_transport(values: Mapping[str, Any], teachers: tuple[TeacherConfig, ...] = ()) -> list[str]:
    """Credentials and TLS settings that would fail at the first request: report them now."""
    import ssl

    problems = []
    bundles: dict[str, str] = {}
    if values.get("ca_bundle"):
        bundles[values["ca_bundle"]] = "xvocab_ca_bundle"
    for t in teachers:
        label = "xvocab_teacher_urls" if t.name == DEFAULT_TEACHER_NAME else f"teacher {t.name!r}: urls"
        key = "xvocab_api_key" if t.name == DEFAULT_TEACHER_NAME else "api_key"
        if t.api_key and any(has_credentials(u) for u in t.urls):
            problems.append(
                f"{label} carries user:password@ and {key} is set too: an HTTP request can carry only one "
                "Authorization header; keep one"
            )
        if t.ca_bundle and t.ca_bundle not in bundles:
            bundles[t.ca_bundle] = f"teacher {t.name!r}: ca_bundle"
    for bundle, label in bundles.items():
        try:
            ssl.create_default_context(cafile=bundle)
        except (OSError, ssl.SSLError) as exc:
            problems.append(
                f"{label}={bundle!r} cannot be used ({type(exc).__name__}: {exc}); give a readable PEM "
                "file of CA certificates"
            )
    return problems


def _build_teachers(
    values: Mapping[str, Any], environ: Mapping[str, str]
) -> tuple[tuple[TeacherConfig, ...], list[str], list[str]]:
    """The teachers of the configuration: the ``xvocab_teachers`` entries, or the single-teacher keys.

    Returns:
        ``(teachers, problems, warnings)``; ``teachers`` is empty when a required setting is missing (reported
        by :func:`_check_required`) or an entry has problems.
    """
    defaults = {name: values.get(name, _field_default(name)) for name in TEACHER_OVERRIDES}
    entries = values.get("teachers")
    if not entries:
        if not values.get("teacher_tokenizer") or not values.get("teacher_urls"):
            return (), [], []
        one = TeacherConfig(
            DEFAULT_TEACHER_NAME, values["teacher_tokenizer"], values["teacher_urls"], values.get("api_key"), **defaults
        )
        return (one,), [], []
    problems: list[str] = []
    warned: list[str] = []
    teachers = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        name = entry.get("name")
        label = f"xvocab_teachers[{i}]" + (f" ({name!r})" if isinstance(name, str) else "")
        found, where = _teacher_entry(entry, label, defaults, environ)
        problems += where
        if not isinstance(name, str) or not _TEACHER_NAME.match(name):
            problems.append(f"{label}: name must be 1-64 letters, digits, '_', '.', '-' (names metrics), got {name!r}")
        elif name in seen:
            problems.append(f"{label}: duplicate teacher name {name!r}; every teacher needs its own name")
        else:
            seen.add(name)
        if "api_key" in entry:
            warned.append(
                f"{label}: api_key is written in the YAML / flags, which slime prints at start-up; use api_key_env"
            )
        if found is not None and not where:
            teachers.append(TeacherConfig(name=name, **found))
    if values.get("api_key"):
        warned.append(
            "xvocab_api_key / XVOCAB_API_KEY is set but xvocab_teachers is used: listed teachers never get the "
            "top-level key; give each its own api_key_env"
        )
    return (tuple(teachers) if not problems else ()), problems, warned


def _teacher_entry(
    entry: Mapping[str, Any], label: str, defaults: Mapping[str, Any], environ: Mapping[str, str]
) -> tuple[dict[str, Any] | None, list[str]]:
    """The settings of one ``xvocab_teachers`` entry (name aside), checked: ``(settings, problems)``."""
    problems = [
        f"{label}: unknown key {k!r}{_did_you_mean(str(k), list(TEACHER_ENTRY_KEYS))}"
        for k in entry
        if k not in TEACHER_ENTRY_KEYS
    ]
    out: dict[str, Any] = dict(defaults)
    tokenizer = entry.get("tokenizer")
    if not isinstance(tokenizer, str) or not tokenizer.strip():
        problems.append(f"{label}: tokenizer is missing (the path or hub id the teacher server was launched with)")
    else:
        out["tokenizer"] = tokenizer.strip()
    try:
        out["urls"] = _coerce(entry.get("urls") or (), _FIELDS["teacher_urls"].metadata)
    except ValueError as exc:
        problems.append(f"{label}: urls = {redact_url(repr(entry.get('urls')))}: {exc}")
    if "urls" in out and not out["urls"]:
        problems.append(f"{label}: urls is missing (the teacher server's URL(s), or its sglang-router URL)")
    out["api_key"], key_problems = _teacher_key(entry, label, environ)
    problems += key_problems
    for key in TEACHER_OVERRIDES:
        if entry.get(key) is None:
            continue
        try:
            out[key] = _coerce(entry[key], _FIELDS[key].metadata)
        except ValueError as exc:
            problems.append(f"{label}: {key} = {_shown(key, entry[key])}: {exc}")
    if out["max_failed_fraction"] > 1.0:
        problems.append(f"{label}: max_failed_fraction must be <= 1.0 (1.0 = never stop)")
    return out, problems


def _teacher_key(entry: Mapping[str, Any], label: str, environ: Mapping[str, str]) -> tuple[str | None, list[str]]:
    """A listed teacher's API key: ``api_key``, or the environment variable named by ``api_key_env``."""
    key, env = entry.get("api_key"), entry.get("api_key_env")
    if key is not None and env is not None:
        return None, [f"{label}: api_key and api_key_env are both set; keep api_key_env"]
    if env is not None:
        if not isinstance(env, str) or not env:
            return None, [f"{label}: api_key_env must be the name of an environment variable"]
        if not environ.get(env):
            return None, [f"{label}: api_key_env names {env!r}, which is not set in this process's environment"]
        return environ[env], []
    if key is not None and (not isinstance(key, str) or not key):
        return None, [f"{label}: api_key = <redacted {type(key).__name__}>: must be a non-empty string"]
    return key, []


def _build_routes(
    values: Mapping[str, Any], teachers: tuple[TeacherConfig, ...]
) -> tuple[dict[str, Route], Route, list[str]]:
    """``(routes by value, default route, problems)`` of xvocab_teacher_routes / xvocab_default_teacher."""
    names = [t.name for t in teachers]
    problems, routes = [], {}
    for value, target in (values.get("teacher_routes") or {}).items():
        try:
            routes[str(value)] = normalise_route(target, names)
        except ValueError as exc:
            problems.append(f"xvocab_teacher_routes[{value!r}]: {exc}")
    default: Route = ((names[0], 1.0),)
    if values.get("default_teacher") is not None:
        try:
            default = normalise_route(values["default_teacher"], names)
        except ValueError as exc:
            problems.append(f"xvocab_default_teacher: {exc}")
    if routes and not values.get("teacher_route_key"):
        problems.append(
            "xvocab_teacher_routes is set but xvocab_teacher_route_key is not: name the sample.metadata field "
            "whose value picks the route (e.g. source)"
        )
    return routes, default, problems


def _field_default(name: str) -> Any:
    f = _FIELDS[name]
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def _transport_warnings(config: XVocabConfig, *, key_from_args: bool) -> list[str]:
    out = []
    for t in config.teachers:
        plain = [u for u in t.urls if u.lower().startswith("http://") and not is_loopback(u)]
        if plain and (t.api_key or any(has_credentials(u) for u in plain)):
            out.append(
                f"teacher credentials go in clear text over plain http to {redact_url(plain[0])}: use https:// "
                "(xvocab_ca_bundle for a private CA) or keep the teacher on a private network"
            )
    if key_from_args:
        out.append(
            f"xvocab_api_key is set in the YAML / flags, which slime prints with its arguments at start-up; set "
            f"the {API_KEY_ENV} environment variable instead"
        )
    if not all(t.verify_tls for t in config.teachers) or not config.verify_tls:
        out.append("xvocab_verify_tls is false: the teacher's certificate is not checked (testing only)")
    return out


def _warnings(config: XVocabConfig, args: Any) -> list[str]:
    out = []
    temperature = getattr(args, "rollout_temperature", None)
    teacher_t = 1.0 if config.teacher_temperature is None else config.teacher_temperature
    if temperature is not None and float(temperature) != teacher_t:
        out.append(
            f"xvocab_teacher_temperature is {teacher_t} but --rollout-temperature is {temperature}: slime "
            "divides the student's logits by the rollout temperature, so the OPD delta compares different "
            "temperatures. Leave xvocab_teacher_temperature unset (it follows --rollout-temperature)."
        )
    if teacher_t != 1.0:
        out.append(
            f"teacher log-probs at temperature {teacher_t} need an SGLang teacher with input_logprob_temperature "
            "(sglang#36213); a server without it answers at temperature 1 (the plugin warns on its first answer). "
            "--rollout-temperature 1 avoids the question."
        )
    top_p = getattr(args, "rollout_top_p", None)
    if top_p is not None and float(top_p) < 1.0:
        out.append(
            f"--rollout-top-p is {top_p}: slime renormalises the student's log-probs over the sampled nucleus, "
            "while the teacher's are scored over its full vocabulary, so the OPD delta carries the student's "
            "log(nucleus mass) on every token. Use --rollout-top-p 1 for distillation."
        )
    if config.unscored == "keep" and getattr(args, "use_rollout_logprobs", None) is False:
        out.append(
            "xvocab_unscored is keep without --use-rollout-logprobs: positions without a teacher value get the "
            "student's SGLang rollout log-prob, but slime's OPD delta uses Megatron's recomputed log-prob, so "
            "their delta is the train/inference mismatch, not 0. Add --use-rollout-logprobs (delta exactly 0) "
            "or set xvocab_unscored: mask (docs/how-it-fits.md)."
        )
    if config.unscored == "keep" and getattr(args, "normalize_advantages", False):
        out.append(
            "xvocab_unscored is keep with --normalize-advantages: whitening moves the zero OPD delta of positions "
            "without a teacher value by the batch mean; set xvocab_unscored: mask to keep them out of the loss."
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
    "opt_float": "number",
    "bool": "boolean",
    "teachers": "list of teachers",
    "route": "teacher name or {name: weight}",
}


def _format_default(entry: Mapping[str, Any]) -> str:
    default = entry["default"]
    if entry["name"] == "student_tokenizer":
        return "`--hf-checkpoint`"
    if entry["name"] == "teacher_urls":
        return "`--rm-url`"
    if entry["name"] == "teacher_temperature":
        return "`--rollout-temperature`"
    if entry["name"] == "default_teacher":
        return "the first teacher"
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
