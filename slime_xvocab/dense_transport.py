"""Getting dense targets from slime's rollout to its loss.

Stock slime ships a fixed list of per-sample keys from the rollout manager to the training actors
(``RolloutManager._split_train_data_by_dp``) and from there to the loss (the data iterator's key list); a
custom convert function's extra keys are dropped on the way. The route here needs one small runtime extension
on the rollout side and only slime's own hooks on the training side:

1. **Reward hook** (rollout manager): :func:`set_sample_targets` keeps each sample's
   :class:`~slime_xvocab.dense.DenseTargets` in ``sample.metadata["xvocab_dense"]``.
2. **Reward post-process** (``slime_xvocab.hooks.post_process_rewards``, which slime's own
   ``_convert_samples_to_train_data`` calls with the flat sample list in train-data order): :func:`collect`
   keeps the targets of that list, in that order.
3. **Per-rank split** (the extension): slime's ``_split_train_data_by_dp`` builds one dict per data-parallel
   rank, ``{"partition": [sample indices], ...}``, and passes each to the module function
   ``tensorize_rollout_data_for_training`` (``_tensorize_rollout_data_for_training`` on v0.3.1) before
   ``ray.put``. :func:`install_rollout_side` wraps that one function in ``slime.ray.rollout``'s namespace so
   each rank's dict also gets ``"xvocab_dense": [targets[i] for i in partition]``, after checking every
   target's length against the sample's ``response_lengths`` and total length against ``tokens``.
4. **Training actor**: ``--rollout-data-postprocess-path slime_xvocab.dense_transport.attach_dense_targets``
   (slime's hook, run after advantages and before training) pops the key, checks it sample by sample and
   attaches each sample's targets to its ``loss_masks`` tensor, which slime's data iterator hands to the loss
   as the same object.
5. **Loss**: :func:`slime_xvocab.dense_loss.targets_of` reads them back.

Guarantees: a sample trains with the targets computed for it or training stops with an error; never silently
without. Any break in the chain raises: no targets collected for a split (:class:`DenseTransportError`), a
count or length mismatch at the split or in the actor, a micro-batch without targets in the loss
(:class:`~slime_xvocab.dense_loss.DenseTargetsMissing`). :func:`check_rollout_side` runs at start-up (the
reward hook's first call, in the rollout manager) and refuses a slime whose code does not have the shape this
relies on (checked on the code objects, not on version strings), and launch flags that would bypass it.

Supported: slime v0.3.1 (a6272da0) and main as of 624b824a (2026-08-21). v0.3.0 and older put each rank's dict
into Ray's object store without a function between: refused at start-up. The equivalent upstream patch (a
``--custom-rollout-data-keys`` list appended to both key lists) is written out in docs/dense.md.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Sequence
from typing import Any

from .dense import DenseTargets
from .errors import ConfigError, XVocabError

__all__ = [
    "DENSE_KEY",
    "DenseTransportError",
    "attach_dense_targets",
    "check_rollout_side",
    "collect",
    "install_rollout_side",
    "sample_targets",
    "set_sample_targets",
]

logger = logging.getLogger(__name__)

#: Key in ``sample.metadata`` and in each rank's rollout data.
DENSE_KEY = "xvocab_dense"
#: slime's per-rank tensorize function, by version (main, v0.3.1).
TENSORIZE_NAMES = ("tensorize_rollout_data_for_training", "_tensorize_rollout_data_for_training")
LOSS_PATH = "slime_xvocab.dense_loss.dense_distill_loss"
POSTPROCESS_PATH = "slime_xvocab.dense_transport.attach_dense_targets"
REWARD_POST_PROCESS_PATH = "slime_xvocab.hooks.post_process_rewards"
_WRAPPED = "__xvocab_dense__"


class DenseTransportError(XVocabError):
    """Dense targets could not be matched to the samples they were computed for."""


def set_sample_targets(sample: Any, targets: DenseTargets) -> None:
    """Keep ``targets`` in ``sample.metadata["xvocab_dense"]`` (copying the dict: group siblings may share one)."""
    md = dict(sample.metadata) if isinstance(getattr(sample, "metadata", None), dict) else {}
    md[DENSE_KEY] = targets
    sample.metadata = md


def sample_targets(sample: Any) -> DenseTargets | None:
    """The sample's DenseTargets, or None."""
    md = getattr(sample, "metadata", None)
    found = md.get(DENSE_KEY) if isinstance(md, dict) else None
    return found if isinstance(found, DenseTargets) else None


# --------------------------------------------------------------------------------------------------
# Rollout side


class _Pending:
    """The targets of the flat sample list of the conversion in progress (one rollout manager, one at a time)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.targets: list[tuple[DenseTargets, int]] | None = None


_PENDING = _Pending()


def collect(samples: Sequence[Any]) -> None:
    """Keep the targets of ``samples`` (slime's flat train-data order) for the per-rank split.

    Raises:
        DenseTransportError: a sample has no targets.
    """
    out = []
    for k, sample in enumerate(samples):
        targets = sample_targets(sample)
        if targets is None:
            raise DenseTransportError(
                f"sample {k} (index={getattr(sample, 'index', None)}) has no dense targets: it did not go through "
                "slime_xvocab.hooks.reward_func with xvocab_dense on"
            )
        out.append((targets, len(sample.tokens)))
    with _PENDING.lock:
        _PENDING.targets = out


def _per_rank(rollout_data: dict) -> None:
    """Add ``rollout_data["xvocab_dense"]`` for one rank's dict, from its ``partition``."""
    with _PENDING.lock:
        pending = _PENDING.targets
    if pending is None:
        raise DenseTransportError(
            "slime is splitting train data but no dense targets were collected for it: "
            f"--custom-reward-post-process-path must be {REWARD_POST_PROCESS_PATH} and no "
            "--custom-convert-samples-to-train-data-path may replace slime's conversion (docs/dense.md)"
        )
    partition = list(rollout_data["partition"])
    if partition and max(partition) >= len(pending):
        raise DenseTransportError(f"partition index {max(partition)} beyond the {len(pending)} collected targets")
    chosen = [pending[i] for i in partition]
    for key, check in (("response_lengths", lambda t, n, v: t.n == int(v)),
                       ("tokens", lambda t, n, v: n == len(v))):
        values = rollout_data.get(key)
        if values is None or len(values) != len(chosen):
            raise DenseTransportError(f"rank data has {None if values is None else len(values)} {key} for "
                                      f"{len(chosen)} partition entries")
        for (targets, n_tokens), value in zip(chosen, values, strict=True):
            if not check(targets, n_tokens, value):
                raise DenseTransportError(f"dense targets do not match their sample's {key}: the samples passed "
                                          "to the reward post-process are not the ones slime split")
    rollout_data[DENSE_KEY] = [t for t, _ in chosen]


def _wrap(tensorize: Any) -> Any:
    if getattr(tensorize, _WRAPPED, False):
        return tensorize

    @functools.wraps(tensorize)
    def tensorize_with_dense_targets(rollout_data: dict, *args: Any, **kwargs: Any) -> Any:
        if "partition" in rollout_data:
            _per_rank(rollout_data)
        return tensorize(rollout_data, *args, **kwargs)

    setattr(tensorize_with_dense_targets, _WRAPPED, True)
    return tensorize_with_dense_targets


def _manager_class(module: Any) -> Any:
    manager = getattr(module, "RolloutManager", None)
    meta = getattr(manager, "__ray_metadata__", None)  # a Ray actor class: the class it wraps
    return getattr(meta, "modified_class", manager)


def check_slime_code(module: Any) -> str:
    """The name of the per-rank function to wrap in ``module`` (slime's ``slime.ray.rollout``).

    Raises:
        ConfigError: the module does not have the shape the transport relies on.
    """
    manager = _manager_class(module)
    problems = []
    split = getattr(manager, "_split_train_data_by_dp", None)
    convert = getattr(manager, "_convert_samples_to_train_data", None)
    names = [n for n in TENSORIZE_NAMES if callable(getattr(module, n, None))]
    code = getattr(split, "__code__", None)
    if code is None or not names:
        problems.append("no RolloutManager._split_train_data_by_dp or per-rank tensorize function")
    else:
        used = [n for n in names if n in code.co_names]
        if len(used) != 1:
            problems.append(f"_split_train_data_by_dp does not call exactly one of {TENSORIZE_NAMES}")
        if "partition" not in code.co_consts:
            problems.append("_split_train_data_by_dp builds no 'partition' entry")
        names = used
    if getattr(getattr(convert, "__code__", None), "co_names", None) is None or \
            "_post_process_rewards" not in convert.__code__.co_names:
        problems.append("_convert_samples_to_train_data does not call _post_process_rewards")
    if problems:
        raise ConfigError(
            "xvocab_dense: this slime's rollout manager does not have the shape slime_xvocab.dense_transport "
            f"needs ({'; '.join(problems)}). Supported: slime v0.3.1 and main as of 624b824a; see docs/dense.md "
            "for the upstream patch that makes the route official."
        )
    return names[0]


def install_rollout_side(module: Any = None) -> str:
    """Wrap the per-rank tensorize function of slime's ``slime.ray.rollout`` (idempotent); returns its name."""
    if module is None:
        try:
            import slime.ray.rollout as module
        except ImportError as exc:
            raise ConfigError(f"xvocab_dense: slime's rollout manager module does not import here ({exc}); the "
                              "dense targets could not be shipped to the training side") from exc
    name = check_slime_code(module)
    setattr(module, name, _wrap(getattr(module, name)))
    return name


def check_args(args: Any) -> list[str]:
    """Launch flags the route needs (only flags ``args`` has are checked)."""
    problems = []

    def flag(key: str, want: Any, fix: str) -> None:
        if hasattr(args, key) and getattr(args, key) != want:
            problems.append(f"--{key.replace('_', '-')} is {getattr(args, key)!r}: {fix}")

    flag("loss_type", "custom_loss", f"use --loss-type custom_loss --custom-loss-function-path {LOSS_PATH}")
    flag("custom_loss_function_path", LOSS_PATH, f"set it to {LOSS_PATH}")
    flag("rollout_data_postprocess_path", POSTPROCESS_PATH, f"set it to {POSTPROCESS_PATH}")
    flag("custom_reward_post_process_path", REWARD_POST_PROCESS_PATH, f"set it to {REWARD_POST_PROCESS_PATH}")
    flag("custom_convert_samples_to_train_data_path", None, "leave it unset: slime's own conversion must run")
    cp = getattr(args, "context_parallel_size", 1)
    if cp not in (None, 1):
        problems.append(f"--context-parallel-size is {cp}: the dense loss supports 1")
    return problems


def check_rollout_side(args: Any = None) -> bool:
    """Start-up check in the rollout manager: launch flags, then slime's code, then install the extension.

    Returns:
        True when installed; False when slime is not importable here (the CPU demo, tests): nothing to patch.

    Raises:
        ConfigError: a flag the route needs is wrong, or slime's code is not of a supported shape.
    """
    problems = check_args(args) if args is not None else []
    if problems:
        raise ConfigError("xvocab_dense needs:\n" + "\n".join(f"  - {p}" for p in problems))
    try:
        import slime  # noqa: F401
    except ImportError:
        logger.info("slime-xvocab: slime not importable here; dense targets stay on the samples")
        return False
    name = install_rollout_side()
    logger.info("slime-xvocab: dense targets ride slime's per-rank split (%s)", name)
    return True


# --------------------------------------------------------------------------------------------------
# Training side


def attach_dense_targets(args: Any, rollout_id: int, rollout_data: dict) -> None:
    """slime ``--rollout-data-postprocess-path`` (training actor, after advantages, before training).

    Pops ``rollout_data["xvocab_dense"]`` (slime's metric logging would choke on it) and attaches each
    sample's targets to its ``loss_masks`` tensor for :func:`slime_xvocab.dense_loss.targets_of`.

    Raises:
        DenseTransportError: the key is missing, or its count or lengths do not match this rank's samples.
    """
    from .dense_loss import TARGETS_ATTR

    targets = rollout_data.pop(DENSE_KEY, None)
    masks = rollout_data.get("loss_masks")
    lengths = rollout_data.get("response_lengths")
    if targets is None:
        raise DenseTransportError(
            f"rollout {rollout_id}: the training actor received no dense targets. The rollout side extension "
            "was not installed (is slime_xvocab.hooks.reward_func the --custom-rm-path with xvocab_dense: true?)"
        )
    if masks is None or lengths is None or not (len(targets) == len(masks) == len(lengths)):
        raise DenseTransportError(f"rollout {rollout_id}: {len(targets)} dense targets for "
                                  f"{None if masks is None else len(masks)} samples on this rank")
    for k, (t, mask, n) in enumerate(zip(targets, masks, lengths, strict=True)):
        if not isinstance(t, DenseTargets) or t.n != int(n) or len(mask) != int(n):
            raise DenseTransportError(f"rollout {rollout_id}: sample {k}'s dense targets do not match its "
                                      f"response length {int(n)}")
        setattr(mask, TARGETS_ATTR, t)
