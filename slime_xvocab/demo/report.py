"""Terminal table, JSON and PNG plot of a demo run."""

from __future__ import annotations

import json
import math
from pathlib import Path

CURVES = [
    ("accuracy", "held-out accuracy (greedy)"),
    ("teacher_lp_per_token", "teacher log-prob / student token"),
    ("reverse_kl_per_token", "reverse KL / token (teacher-scored)"),
    ("answer_len_tokens", "greedy answer length (tokens, incl. end of turn)"),
]


def summary_rows(results: dict) -> list[dict]:
    """One row per mode: first vs last evaluation."""
    rows = []
    for mode, r in results["modes"].items():
        h0, h1 = r["history"][0], r["history"][-1]
        rows.append({
            "mode": mode,
            "acc_before": h0["accuracy"], "acc_after": h1["accuracy"],
            "tlp_before": h0["teacher_lp_per_token"], "tlp_after": h1["teacher_lp_per_token"],
            "tlp_byte_after": h1["teacher_lp_per_byte"],
            "rkl_before": h0["reverse_kl_per_token"], "rkl_after": h1["reverse_kl_per_token"],
            "eot_after": h1["eot_share"], "len_after": h1["answer_len_tokens"],
            "coverage": r["check"].get("coverage", math.nan), "seconds": r["seconds"],
        })
    return rows


def print_table(results: dict, console=None) -> None:
    """Rich summary table."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title=f"OPD summary ({results['scenario']}, {results['config']['opd_steps']} steps per mode)")
    for col in ["mode", "accuracy", "teacher lp/token", "teacher lp/byte", "rev. KL/token", "EOT share",
                "len", "coverage", "time"]:
        t.add_column(col, justify="right")
    for r in summary_rows(results):
        t.add_row(
            r["mode"], f"{r['acc_before']:.1%} -> {r['acc_after']:.1%}",
            f"{r['tlp_before']:.2f} -> {r['tlp_after']:.2f}", f"{r['tlp_byte_after']:.2f}",
            f"{r['rkl_before']:.2f} -> {r['rkl_after']:.2f}", f"{r['eot_after']:.0%}", f"{r['len_after']:.1f}",
            f"{r['coverage']:.0%}", f"{r['seconds']:.0f}s",
        )
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

    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.4))
    for ax, (key, title) in zip(axes, CURVES):
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
