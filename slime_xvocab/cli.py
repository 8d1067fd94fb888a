"""The ``slime-xvocab`` command line: one subcommand per feature, each owned by its module.

    slime-xvocab align          align one text across two real tokenizers and print the chunks
    slime-xvocab serve-teacher  reference SGLang-compatible scoring server (CPU/one GPU)
    slime-xvocab check          preflight a teacher/student pair on your own data
    slime-xvocab demo           the CPU demo of cross-tokenizer on-policy distillation

Each subcommand's module exposes ``cli_main(argv: list[str]) -> int`` and is imported lazily, so
``slime-xvocab --help`` stays fast and a missing optional dependency only affects its own command.
"""

from __future__ import annotations

import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "align": ("slime_xvocab.inspect_alignment", "align one text across two real tokenizers and print the chunks"),
    "serve-teacher": ("slime_xvocab.teacher_server", "serve a model's log-probs with SGLang's /generate protocol"),
    "check": ("slime_xvocab.check", "preflight a teacher/student pair on your own data"),
    "demo": ("slime_xvocab.demo", "run cross-tokenizer on-policy distillation end to end on the CPU"),
}


def _usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = ["usage: slime-xvocab <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    lines += ["", "Run `slime-xvocab <command> --help` for a command's options; `slime-xvocab --version`."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from . import __version__

        print(f"slime-xvocab {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"slime-xvocab: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.cli_main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
