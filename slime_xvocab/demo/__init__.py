"""``slime-xvocab demo``: cross-tokenizer on-policy distillation, end to end, on one CPU machine.

Default scenario: chat-formatted addition ("What is 47 + 35?" -> "82") in the issue's direction: the student
uses the real Qwen3 tokenizer (one token per digit) and chat template, the teacher the real Llama-3.1
tokenizer (up to three digits per token) and chat template (``--student llama3_1`` swaps them). Both are tiny
transformers (``Qwen3ForCausalLM`` / ``LlamaForCausalLM``) over compact vocabularies of real ids. The demo
trains the teacher (SFT, cached), a weak student (short SFT, cached), starts the reference teacher server on
loopback, then runs on-policy distillation through the plugin's slime hooks in four modes at equal budget
and seed:

* ``chunk``: the plugin, byte-exact chunk alignment, a chunk's teacher log-prob split evenly over its
  student tokens (``xvocab_chunk_split: uniform``);
* ``prefix``: the plugin, chunk alignment with ``xvocab_chunk_split: prefix`` (each student token gets the
  teacher's log-prob of its own bytes from the teacher's top-k; "the token ends here" goes to the next token);
* ``exact``: the plugin, only 1:1 token matches get teacher signal;
* ``naive``: slime's stock OPD hooks (student ids sent to the teacher as if the vocabularies matched).

Outputs in ``--out``: ``metrics.json`` (every metric), ``curves.png``, and a summary table in the terminal.

Example:
    slime-xvocab demo --tiny --out /tmp/demo     # same code path in well under a minute
    slime-xvocab demo --out demo-out             # default scenario (< 10 min on 2 cores, first run)
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import asdict, replace
from pathlib import Path

from slime_xvocab.demo.opd import MODES, TINY, DemoConfig

__all__ = ["cli_main", "DemoConfig", "MODES"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slime-xvocab demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny models, few steps (tests/CI; < 1 min)")
    p.add_argument("--real", action="store_true", help="real LMs: SmolLM2-135M-Instruct <- Gemma-3-270M")
    p.add_argument("--mode", choices=[*MODES, "all"], default="all", help="alignment mode(s) to run")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output directory")
    p.add_argument("--steps", type=int, default=None, help="OPD steps per mode (default per scenario)")
    p.add_argument("--student", choices=["llama3_1", "qwen3"], default="qwen3",
                   help="student family; the teacher is the other one (default: Qwen3 student, Llama-3.1 teacher)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=None, help="OPD learning rate")
    p.add_argument("--kl-to-start", type=float, default=None, help="coefficient of the KL to the starting policy")
    p.add_argument("--merge-eot", action="store_true",
                   help="stand-in hooks only: share the last chunk's gap with the end of turn (see docs/results.md)")
    p.add_argument("--inproc-teacher", action="store_true",
                   help="score in process instead of through the reference teacher server (debugging)")
    p.add_argument("--builtin-hooks", action="store_true",
                   help="use the demo's stand-in hooks even if slime_xvocab.hooks is importable")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    return p


def cli_main(argv: list[str]) -> int:
    """Entry point of ``slime-xvocab demo``; returns the exit code."""
    args = _parser().parse_args(argv)
    import warnings

    import torch
    from rich.console import Console

    warnings.filterwarnings("ignore", message="The value of the smallest subnormal")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # tiny weights under weight decay otherwise slow the CPU down a lot
    console = Console()
    if args.real:
        from slime_xvocab.demo.real import run_real

        return run_real(args, console)
    teacher_family = "qwen3" if args.student == "llama3_1" else "llama3_1"
    cfg = DemoConfig(seed=args.seed, student_family=args.student, teacher_family=teacher_family)
    if args.tiny:
        cfg = replace(cfg, **TINY)
    if args.steps is not None:
        cfg = replace(cfg, opd_steps=args.steps)
    if args.lr is not None:
        cfg = replace(cfg, opd_lr=args.lr)
    if args.kl_to_start is not None:
        cfg = replace(cfg, kl_to_start_coef=args.kl_to_start)
    modes = list(MODES) if args.mode == "all" else [args.mode]
    return run_scenario(cfg, modes, args, console, "tiny" if args.tiny else "default")


def run_scenario(cfg: DemoConfig, modes: list[str], args: argparse.Namespace, console, scenario: str) -> int:
    """Prepare models, start the teacher server, run every mode, write the report."""
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from slime_xvocab.assets import cache_dir
    from slime_xvocab.demo import fallback, report, scoring
    from slime_xvocab.demo.models import greedy_accuracy
    from slime_xvocab.demo.opd import inproc_scorer, prepare_model, run_mode, slime_args
    from slime_xvocab.demo.task import all_problems, split_problems

    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_root = cache_dir() / "demo"
    train, held_out = split_problems(all_problems(cfg.lo, cfg.hi), cfg.n_eval, cfg.seed)
    timings: dict[str, float] = {}
    # the plugin's client speaks HTTP only, so an in-process teacher needs the stand-in hooks
    use_plugin = False if (args.builtin_hooks or args.inproc_teacher) else None
    results: dict = {"scenario": scenario, "config": asdict(cfg), "modes": {},
                     "plugin_hooks": bool(scoring.plugin_hooks_available()) and use_plugin is None}
    cols = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(), TextColumn("{task.fields[info]}")]
    # Without a terminal (logs, CI) the bars are off and every evaluation is printed as a line instead.
    with Progress(*cols, console=console, transient=False, disable=not console.is_terminal) as progress:
        models = {}
        for which, steps in (("teacher", cfg.teacher_steps), ("student", cfg.student_steps)):
            task = progress.add_task(f"SFT {which}", total=steps, info="")

            def on_step(step: int, loss: float, task=task) -> None:
                progress.update(task, completed=step + 1, info=f"loss {loss:.3f}")

            t0 = time.time()
            lm, model_dir, cached = prepare_model(cfg, which, cache_root, console.print, on_step)
            progress.update(task, completed=steps, info=f"cached: {model_dir.name}" if cached else "trained")
            if not console.is_terminal:
                console.print(f"{which}: {'cached' if cached else 'trained'} {model_dir} ({time.time() - t0:.0f}s)")
            timings[f"{which}_sft_s"] = time.time() - t0
            models[which] = (lm, model_dir)
        teacher, teacher_dir = models["teacher"]
        student, student_dir = models["student"]
        held_prompts = [teacher.prompt_ids(p.messages()) for p in held_out]
        results["teacher_accuracy"] = greedy_accuracy(teacher, held_prompts, [p.answer for p in held_out],
                                                      cfg.max_new_tokens)
        # OPD matches the teacher's temperature-1 distribution, so its sampled accuracy bounds what OPD can teach
        sampled, _, _ = teacher.sample(held_prompts, cfg.max_new_tokens, temperature=1.0,
                                       generator=torch.Generator().manual_seed(cfg.seed))
        results["teacher_sampled_accuracy"] = sum(
            teacher.decode_response(r).strip() == p.answer for r, p in zip(sampled, held_out)) / len(held_out)
        results["student_vocab"] = student.vocab.size
        results["teacher_vocab"] = teacher.vocab.size
        console.print(f"teacher held-out accuracy {results['teacher_accuracy']:.1%} (greedy), "
                      f"{results['teacher_sampled_accuracy']:.1%} (temperature 1) "
                      f"(compact vocab {teacher.vocab.size}); student vocab {student.vocab.size}")

        with contextlib.ExitStack() as stack:
            if args.inproc_teacher:
                url = "inproc://teacher"
                fallback.INPROC_TEACHERS[url] = inproc_scorer(teacher)
            else:
                from slime_xvocab.teacher_server import start_teacher_server

                t0 = time.time()
                handle = start_teacher_server(teacher_dir, port=0)
                stack.callback(handle.stop)
                url = handle.url
                timings["teacher_server_start_s"] = time.time() - t0
                console.print(f"teacher server: {url} ({timings['teacher_server_start_s']:.1f}s to start)")
            results["teacher_url"] = url
            for mode in modes:
                if mode == "prefix" and scoring.hook_paths(mode, use_plugin)[0] != scoring.PLUGIN_RM:
                    console.print("skipping mode prefix: it needs the plugin's hooks (drop --builtin-hooks / "
                                  "--inproc-teacher)")
                    continue
                sargs = slime_args(mode, url, student_dir, teacher_dir, student, teacher, cfg, use_plugin)
                sargs.demo_merge_eot = args.merge_eot
                task = progress.add_task(f"OPD {mode:<5}", total=cfg.opd_steps, info="")

                def on_progress(step: int, m: dict, task=task, mode=mode) -> None:
                    if m.get("train"):
                        progress.update(task, completed=step, info=(
                            f"rKL {m['train_reverse_kl']:.2f}  KL0 {m['kl_to_start']:.3f}"))
                    else:
                        info = f"acc {m['accuracy']:.0%}  tlp/tok {m['teacher_lp_per_token']:.2f}"
                        progress.update(task, completed=step, info=info)
                        if not console.is_terminal:  # logs and CI: one line per evaluation
                            console.print(f"OPD {mode} step {step}: {info}  ({m['seconds']:.0f}s)")

                r = run_mode(mode, cfg, student, sargs, train, held_out, on_progress)
                r["hooks"] = [sargs.custom_rm_path, sargs.custom_reward_post_process_path]
                results["modes"][mode] = r
                timings[f"opd_{mode}_s"] = r["seconds"]
    timings["total_s"] = time.time() - t_start
    results["timings"] = timings
    report.print_table(results, console)
    jpath = report.write_json(results, out)
    ppath = report.plot(results, out)
    console.print(f"wrote {jpath} and {ppath}; total {timings['total_s']:.0f}s")
    return 0
