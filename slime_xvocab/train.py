"""Start slime training with real ``--xvocab-*`` flags (stock ``train.py`` silently drops unknown flags).

slime's ``train.py`` calls ``parse_args()`` with no custom arguments, and its Megatron parser ignores flags
it does not know, so ``--xvocab-teacher-urls ...`` given to it vanishes without an error. This entry point
registers every setting of :class:`~slime_xvocab.config.XVocabConfig` as a flag through slime's
``parse_args(add_custom_arguments=...)``, validates the configuration on the driver (before any GPU is
claimed), then runs slime's own training loop::

    ray job submit ... -- python3 -m slime_xvocab.train \\
        ${MODEL_ARGS[@]} ... \\
        --custom-rm-path slime_xvocab.hooks.reward_func ... \\
        --xvocab-teacher-tokenizer /models/Llama-3.1-70B-Instruct --xvocab-teacher-urls http://10.0.0.7:30000

The loop is slime's ``train.py`` found next to the installed ``slime`` package (a source checkout, as in
slime's docker image); set ``SLIME_XVOCAB_TRAIN_SCRIPT`` to another file (e.g. ``<slime checkout>/train_async.py``)
to run that one instead. The YAML route (``--custom-config-path`` with ``xvocab_*`` keys) needs none of
this and works with stock ``train.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import fields_reference

__all__ = ["add_xvocab_arguments", "load_slime_train", "main"]

TRAIN_SCRIPT_ENV = "SLIME_XVOCAB_TRAIN_SCRIPT"


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _json_of(kind: type, name: str):
    """An argparse type: JSON text that must decode to ``kind`` (``dict``: an object, ``list``: an array)."""

    def parse(text: str):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected a JSON {name}, got {text!r} ({exc})") from None
        if not isinstance(value, kind):
            raise argparse.ArgumentTypeError(f"expected a JSON {name}, got {text!r}")
        return value

    return parse


_json_object = _json_of(dict, "object")
_json_list = _json_of(list, "array")


def _route(text: str) -> str | dict:
    """A teacher name, or a JSON object ``{name: weight}``."""
    return _json_object(text) if text.strip().startswith("{") else text


_TYPES: dict[str, Callable[[str], Any]] = {
    "str": str,
    "opt_str": str,
    "choice": str,
    "urls": str,
    "dict": _json_object,
    "int": int,
    "opt_int": int,
    "float": float,
    "opt_float": float,
    "bool": _bool,
    "teachers": _json_list,
    "route": _route,
}


def add_xvocab_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register ``--xvocab-<name>`` for every :class:`XVocabConfig` setting (slime's add_custom_arguments).

    Every flag defaults to ``None`` (= unset), so a ``--custom-config-path`` YAML or an ``XVOCAB_*``
    environment variable can still provide the value; validation happens in ``XVocabConfig.from_args``.
    Lists (``--xvocab-teacher-urls``) are comma-separated, dicts (``--xvocab-template-kwargs``) JSON.

    Args:
        parser: an ``argparse.ArgumentParser`` (slime passes its Megatron parser).

    Returns:
        The same parser, as slime's ``add_custom_arguments`` contract requires.
    """
    group = parser.add_argument_group(
        title="slime-xvocab", description="cross-vocabulary OPD (docs/configuration.md)"
    )
    for entry in fields_reference():
        kwargs: dict[str, Any] = {
            "dest": entry["key"],
            "type": _TYPES[entry["kind"]],
            "default": None,
            "help": entry["help"].replace("%", "%%") + f" (env {entry['env']})",
        }
        if entry["choices"]:
            kwargs["choices"] = list(entry["choices"])
        group.add_argument(entry["flag"], **kwargs)
    return parser


def load_slime_train(script: str | os.PathLike | None = None) -> Callable[[Any], None]:
    """slime's ``train(args)`` function, from ``train.py`` at the root of the slime checkout.

    Args:
        script: path of the training script; default ``$SLIME_XVOCAB_TRAIN_SCRIPT`` or the ``train.py``
            next to the installed ``slime`` package.

    Raises:
        RuntimeError: slime is not importable or the script cannot be found (the message says how to fix it).
    """
    script = script or os.environ.get(TRAIN_SCRIPT_ENV)
    if script is None:
        try:
            import slime
        except ImportError as exc:
            raise RuntimeError(
                "slime is not importable: run this inside slime's environment (e.g. its docker image), with "
                "`pip install -e <slime checkout>` done"
            ) from exc
        script = Path(next(iter(slime.__path__))).resolve().parent / "train.py"
    path = Path(script)
    if not path.is_file():
        raise RuntimeError(
            f"slime's training script {str(path)!r} does not exist; set {TRAIN_SCRIPT_ENV} to the path of "
            "slime's train.py (or train_async.py)"
        )
    spec = importlib.util.spec_from_file_location("slime_train_entry", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.path.insert(0, str(path.parent))  # the script's own sibling imports
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    train = getattr(module, "train", None)
    if not callable(train):
        raise RuntimeError(f"{str(path)!r} has no train(args) function")
    return train


def main(argv: list[str] | None = None) -> int:
    """Parse slime's and the ``--xvocab-*`` flags, validate the xvocab config, run slime's training loop."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    from slime.utils.arguments import parse_args

    from .config import XVocabConfig

    args = parse_args(add_custom_arguments=add_xvocab_arguments)
    XVocabConfig.from_args(args)  # fail on the driver, before placement groups claim GPUs
    load_slime_train()(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
