"""Terminal table, JSON and PNG plot of a demo run."""

from __future__ import annotations

import json
import math
from pathlib import Path

# (metric, panel title); the default scenario has a right answer, the --real one only the teacher's judgement
CURVES = {
    "task": [
        ("accuracy", "held-out accuracy (greedy)"),
        ("teacher_lp_per_token", "teacher log-prob / student token"),
        ("reverse_kl_per_token", "reverse KL / token (teacher-scored)"),
        ("answer_len_tokens", "greedy answer length (tokens, incl. end of turn)"),
    ],
    "chat": [
        ("teacher_lp_per_byte", "teacher log-prob / byte"),
        ("reverse_kl_per_byte", "reverse KL / byte (teacher-scored)"),
        ("eot_share", "answers that end their turn"),
        ("bytes_per_token", "bytes / student token (collapse shows here)"),
    ],
}


def _kind(results: dict) -> str:
    first = next(iter(results["modes"].values()), {"history": [{}]})["history"][0]
    return "task" if "accuracy" in first else "chat"


def summary_rows(results: dict) -> list[dict]:
    """One row per mode: first vs last evaluation."""
    rows = []
    for mode, r in results["modes"].items():
        h0, h1 = r["history"][0], r["history"][-1]
        row = {"mode": mode, "coverage": r["check"].get("coverage", math.nan), "seconds": r["seconds"]}
        for key in ("accuracy", "teacher_lp_per_token", "teacher_lp_per_byte", "reverse_kl_per_token",
                    "reverse_kl_per_byte", "eot_share", "answer_len_tokens", "bytes_per_token"):
            row[key] = (h0.get(key, math.nan), h1.get(key, math.nan))
        rows.append(row)
    return rows


def print_table(results: dict, console=None) -> None:
    """Rich summary table (before -> after, per mode)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    kind = _kind(results)
    cols = [("accuracy", "accuracy", "{:.1%}")] if kind == "task" else []
    cols += [
        ("teacher_lp_per_token", "teacher lp/token", "{:.2f}"),
        ("teacher_lp_per_byte", "teacher lp/byte", "{:.3f}"),
        ("reverse_kl_per_token" if kind == "task" else "reverse_kl_per_byte",
         "rev. KL/token" if kind == "task" else "rev. KL/byte", "{:.3f}"),
        ("eot_share", "EOT share", "{:.0%}"),
        ("answer_len_tokens", "len", "{:.1f}"),
    ]
    if kind == "chat":
        cols.append(("bytes_per_token", "bytes/token", "{:.2f}"))
    t = Table(title=f"OPD summary ({results['scenario']}, {results['config']['opd_steps']} steps per mode; "
                    "before -> after)")
    for col in ["mode", *(c[1] for c in cols), "coverage", "time"]:
        t.add_column(col, justify="right")
    for r in summary_rows(results):
        cells = [f"{fmt.format(r[key][0])} -> {fmt.format(r[key][1])}" for key, _, fmt in cols]
        t.add_row(r["mode"], *cells, f"{r['coverage']:.0%}", f"{r['seconds']:.0f}s")
    console.print(t)


def write_json(results: dict, out: Path) -> Path:
    path = Path(out) / "metrics.json"
    path.write_text(json.dumps(results, indent=1, default=str))
    return path


def plot(results: dict, out: Path) -> Path:
    """curves.png: one panel per metric, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = CURVES[_kind(results)]
    fig, axes = plt.subplots(1, len(curves), figsize=(4.2 * len(curves), 3.4))
    for ax, (key, title) in zip(axes, curves):
        for mode, r in results["modes"].items():
            xs = [h["step"] for h in r["history"]]
            ax.plot(xs, [h[key] for h in r["history"]], marker="o", ms=3, label=mode)
        if key == "accuracy" and "teacher_accuracy" in results:
            ax.axhline(results["teacher_accuracy"], ls="--", c="gray", lw=1, label="teacher")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("OPD step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"slime-xvocab CPU demo: {results['scenario']}", fontsize=11)
    fig.tight_layout()
    path = Path(out) / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
