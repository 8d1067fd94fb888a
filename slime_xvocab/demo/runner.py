"""What both demo scenarios share: progress bars, the teacher server, the per-mode OPD runs and the report."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from slime_xvocab.demo.models import ChatLM
from slime_xvocab.demo.opd import OPDSettings


def progress_bars(console):
    """A rich progress display; without a terminal (logs, CI) it is off and evaluations are printed as lines."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    cols = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(), TextColumn("{task.fields[info]}")]
    return Progress(*cols, console=console, transient=False, disable=not console.is_terminal)


def eval_summary(m: dict) -> str:
    """One line of the evaluation metrics that matter (accuracy only where the task has one)."""
    head = f"acc {m['accuracy']:.0%}  " if "accuracy" in m else ""
    return (f"{head}tlp/tok {m['teacher_lp_per_token']:.2f}  tlp/B {m['teacher_lp_per_byte']:.3f}  "
            f"EOT {m['eot_share']:.0%}  B/tok {m['bytes_per_token']:.2f}")


def run_modes(
    modes: Sequence[str],
    cfg: OPDSettings,
    student: ChatLM,
    student_dir: Path,
    teacher_dir: Path,
    train: Sequence,
    held_out: Sequence,
    *,
    progress,
    console,
    evaluate: Callable,
    teacher_template_kwargs: dict | None = None,
    teacher_end_of_turn: str | None = None,
    unscored: str = "keep",
    server_threads: int = 1,
    server_args: Sequence[str] = (),
    timings: dict[str, float],
) -> dict:
    """Start the reference teacher server on loopback, run OPD once per mode from the same student, stop it.

    Returns:
        ``{"teacher_url": ..., "modes": {mode: run_mode(...) result + "hooks"}}``.
    """
    from slime_xvocab.demo.opd import run_mode, slime_args
    from slime_xvocab.teacher_server import start_teacher_server

    t0 = time.time()
    with start_teacher_server(teacher_dir, port=0, num_threads=server_threads, extra_args=server_args) as handle:
        timings["teacher_server_start_s"] = time.time() - t0
        console.print(f"teacher server: {handle.url} ({timings['teacher_server_start_s']:.1f}s to start)")
        out: dict = {"teacher_url": handle.url, "modes": {}}
        for mode in modes:
            sargs = slime_args(mode, handle.url, student_dir, teacher_dir, cfg,
                               teacher_template_kwargs=teacher_template_kwargs,
                               teacher_end_of_turn=teacher_end_of_turn, unscored=unscored)
            task = progress.add_task(f"OPD {mode:<6}", total=cfg.opd_steps, info="")

            def on_progress(step: int, m: dict, task=task, mode=mode) -> None:
                if m.get("train"):
                    progress.update(task, completed=step, info=(
                        f"rKL {m['train_reverse_kl']:.2f}  KL0 {m['kl_to_start']:.3f}"))
                    return
                info = eval_summary(m)
                progress.update(task, completed=step, info=info)
                if not console.is_terminal:  # logs and CI: one line per evaluation
                    console.print(f"OPD {mode} step {step}: {info}  ({m['seconds']:.0f}s)")

            r = run_mode(mode, cfg, student, sargs, train, held_out, on_progress, evaluate=evaluate)
            r["hooks"] = [sargs.custom_rm_path, sargs.custom_reward_post_process_path]
            out["modes"][mode] = r
            timings[f"opd_{mode}_s"] = r["seconds"]
    return out


def finish(results: dict, out: Path, console, t_start: float) -> int:
    """Print the summary table, write ``metrics.json`` and ``curves.png``; return the exit code (0)."""
    from slime_xvocab.demo import report

    results["timings"]["total_s"] = time.time() - t_start
    report.print_table(results, console)
    jpath = report.write_json(results, out)
    ppath = report.plot(results, out)
    console.print(f"wrote {jpath} and {ppath}; total {results['timings']['total_s']:.0f}s")
    return 0


def modes_of(args: argparse.Namespace, all_modes: Sequence[str]) -> list[str]:
    """The modes ``--mode`` asks for (``all``: every mode, in order)."""
    return list(all_modes) if args.mode == "all" else [args.mode]


# ``slime-xvocab demo`` flag -> the config field it sets (both scenarios' configs have the OPD ones).
CLI_OVERRIDES = (
    ("steps", "opd_steps"),
    ("batch", "opd_batch"),
    ("lr", "opd_lr"),
    ("kl_to_start", "kl_to_start_coef"),
    ("warmup", "opd_warmup_steps"),
    ("opd_seed", "opd_seed"),
    ("teacher_end_of_turn", "teacher_end_of_turn"),
)


def with_cli_overrides(cfg, args: argparse.Namespace):
    """``cfg`` with the value of every flag in :data:`CLI_OVERRIDES` the user gave (flags left at None keep it)."""
    given = {key: getattr(args, flag) for flag, key in CLI_OVERRIDES if getattr(args, flag, None) is not None}
    return replace(cfg, **given)
