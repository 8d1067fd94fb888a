"""``slime-xvocab demo --real``: the whole pipeline on two real chat LMs, SmolLM2-135M-Instruct <- Gemma-3-270M.

Student: SmolLM2-135M-Instruct (Llama architecture, 49k-token byte-level BPE, ChatML template, ``<|im_end|>``).
Teacher: Gemma-3-270M (262k-token SentencePiece vocabulary, Gemma-3 chat template, ``<end_of_turn>``), served by
the reference teacher server on loopback. Both come from PyPI wheels as GGUF files and are converted once to
safetensors under the asset cache (:mod:`slime_xvocab.demo.real_models`).

Why this direction: it is the one a CPU can afford (the 135M student samples and trains; the 262k-row teacher
only scores, with its LM head on the response positions), about 15 s per step at batch 8 on 2 cores against
1.5-1.7x that the other way round, and the student is the chat model, so its template and end of turn are real.
The price is that the teacher is a *base* model given a chat template, flatter than the student on chat
answers: OPD pulls the student toward what a small base LM finds likely, not toward better answers. So the
demo makes no quality claim. It shows the mechanics on real tokenizers and templates, how the modes compare on
teacher-scored metrics per token and per byte, and what the guards (a low learning rate, KL to the starting
policy, clipped updates) do against the collapse an unguarded probe showed: measured in docs/results.md, they
keep bytes per token and sentences intact over 12 steps but only slow the drift (fewer answers end their turn).

Run: ``slime-xvocab demo --real --out demo-real`` (first run: ~5 min of downloads and conversion).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from slime_xvocab.demo.opd import MODES, OPDSettings


@dataclass
class RealConfig(OPDSettings):
    """Knobs of the ``--real`` scenario: the shared OPD settings with real-LM defaults, plus its own."""

    opd_steps: int = 12
    opd_batch: int = 8
    opd_lr: float = 1e-5  # 5e-5 without KL to the start collapsed within 4 steps (docs/results.md)
    opd_warmup_steps: int = 0
    kl_to_start_coef: float = 0.2
    max_new_tokens: int = 48
    eval_every: int = 4
    n_eval: int = 8  # held-out prompts
    eval_samples: int = 2  # temperature-1 answers per held-out prompt at each evaluation
    teacher_dtype: str = "auto"  # "auto": bfloat16 where the CPU has native bf16 (2.4x faster there), else fp32
    # Gemma-3-270M is a base model: it never learned <end_of_turn> (log-prob -21 to -31 after a finished answer,
    # which would teach the student never to stop), but its <eos> reads as "the text ends here" (-4 to -7 after
    # a finished answer, -9 to -14 mid-answer). So the student's <|im_end|> is scored as <eos>.
    teacher_end_of_turn: str = "<eos>"


STUDENT_EOT = "<|im_end|>"


def load_student(progress=print):
    """SmolLM2-135M-Instruct as a :class:`~slime_xvocab.demo.models.ChatLM` over its full vocabulary."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slime_xvocab.demo.models import ChatLM
    from slime_xvocab.demo.real_models import smollm2_dir
    from slime_xvocab.demo.vocab import IdentityVocab

    path = smollm2_dir(progress)
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    rows = model.get_output_embeddings().weight.shape[0]
    return ChatLM(tok, IdentityVocab(rows), model, tok.convert_tokens_to_ids(STUDENT_EOT), {}), path


def pipeline_preview(args_ns: argparse.Namespace, prompt, student) -> dict:
    """What one sample looks like on both sides: templates, token counts, end-of-turn mapping, alignment."""
    from slime_xvocab.hooks import teacher_view_builder

    builder = teacher_view_builder(args_ns)
    answer = "Paris is the capital of France. 🇫🇷"
    s_ids = student.prompt_ids(prompt.messages())
    r_ids = student.tokenizer.encode(answer, add_special_tokens=False) + [student.eot_id]
    view = builder.build(prompt.messages(), r_ids)
    t_tok = builder.teacher_tokenizer
    a = view.alignment
    return {
        "student_prompt": student.tokenizer.decode(s_ids),
        "teacher_prompt": view.prompt_text,
        "answer": answer,
        "student_response_tokens": student.tokenizer.convert_ids_to_tokens(r_ids),
        "teacher_response_tokens": t_tok.convert_ids_to_tokens(view.response_ids),
        "student_end_of_turn": STUDENT_EOT,
        "teacher_end_of_turn": t_tok.convert_ids_to_tokens(list(view.eot_ids)),
        "eot_mapped": view.eot_mapped,
        "chunks": int(a.num_chunks),
        "one_to_one_tokens": int(a.one_to_one().sum()),
        "coverage": float((a.student_chunk >= 0).mean()),
    }


def run_real(args: argparse.Namespace, console) -> int:
    """Prepare the two real LMs, run OPD in every requested mode through the teacher server, write the report."""
    from slime_xvocab.demo import runner
    from slime_xvocab.demo.chat_prompts import ChatPrompt, split_prompts
    from slime_xvocab.demo.evaluation import evaluate_chat
    from slime_xvocab.demo.opd import slime_args
    from slime_xvocab.demo.real_models import cpu_has_native_bf16, gemma3_dir

    t_start = time.time()
    cfg = runner.with_cli_overrides(RealConfig(seed=args.seed), args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    results: dict = {"scenario": "real", "config": asdict(cfg), "modes": {}, "timings": timings}

    t0 = time.time()
    student, student_dir = load_student(console.print)
    teacher_dir = gemma3_dir(console.print)
    timings["models_s"] = time.time() - t0
    bf16 = cfg.teacher_dtype == "bfloat16" or (cfg.teacher_dtype == "auto" and cpu_has_native_bf16())
    results["models"] = {
        "student": {"name": "SmolLM2-135M-Instruct", "dir": str(student_dir),
                    "params": sum(p.numel() for p in student.model.parameters()), "vocab": student.vocab.size},
        "teacher": {"name": "Gemma-3-270M (base, Gemma-3 IT chat template)", "dir": str(teacher_dir),
                    "dtype": "bfloat16" if bf16 else "float32"},
    }
    train, held_out = split_prompts(cfg.n_eval, cfg.seed)
    eval_prompts = [p for p in held_out for _ in range(cfg.eval_samples)]

    preview_args = slime_args("student_token", "http://127.0.0.1:1", student_dir, teacher_dir, cfg,
                              teacher_end_of_turn=cfg.teacher_end_of_turn)
    results["pipeline"] = pipeline_preview(preview_args, ChatPrompt("What is the capital of France?"), student)
    pv = results["pipeline"]
    console.print(f"student prompt (ChatML):\n{pv['student_prompt']}")
    console.print(f"teacher prompt (Gemma-3 template, re-rendered from the messages):\n{pv['teacher_prompt']}")
    console.print(f"answer {pv['answer']!r}: student tokens {pv['student_response_tokens']}\n"
                  f"  teacher tokens {pv['teacher_response_tokens']}\n"
                  f"  end of turn {pv['student_end_of_turn']} -> {pv['teacher_end_of_turn']}, "
                  f"{pv['chunks']} chunks, {pv['one_to_one_tokens']}/{len(pv['student_response_tokens'])} "
                  f"student tokens matched 1:1, coverage {pv['coverage']:.0%}")

    with runner.progress_bars(console) as progress:
        results.update(runner.run_modes(
            runner.modes_of(args, MODES), cfg, student, student_dir, teacher_dir, train, eval_prompts,
            progress=progress, console=console, evaluate=evaluate_chat, timings=timings,
            teacher_end_of_turn=cfg.teacher_end_of_turn, unscored=args.unscored,
            server_threads=args.threads, server_args=["--dtype", "bfloat16"] if bf16 else [],
        ))
    return runner.finish(results, out, console, t_start)
