"""The comparison the demo exists for: every way of distilling across tokenizers, at equal budget, paired seeds.

Arms (names chosen not to clash with the plugin's settings):

* ``ceiling``: what distillation gives when the teacher speaks the student's tokenizer: a dense reverse KL,
  ``sum_y pi(y) (log pi(y) - log q(y))`` at every position the student visits, against the teacher's **exact**
  distribution ``q`` over the student's next token (:mod:`slime_xvocab.demo.exact`: every teacher path, no
  top-k). In-process. This is the headline's reference.
* ``oracle_tok``: slime's sampled-token OPD with each sampled token valued exactly by the same teacher
  distribution: same-tokenizer sampled-token OPD, the best any credit rule can feed slime's estimator.
  In-process.
* ``default``: the plugin's default credit (``xvocab_credit_mode: student_token``), through the plugin's real
  slime hooks and the reference teacher server on loopback (top-20, observed teacher tokenization).
* ``uniform``: the plugin with ``xvocab_credit_mode: chunk, xvocab_chunk_split: uniform`` (a chunk's teacher
  log-prob split evenly over its student tokens); hooks + server.
* ``one_to_one``: the plugin with ``xvocab_credit_mode: exact`` (only 1:1 token matches get a value, the rule of
  slime PR #2032); hooks + server.
* ``naive``: slime's stock OPD hooks (student ids sent to the teacher as if the vocabularies matched); server.
* ``sft``: supervised fine-tuning on teacher samples (temperature 1, re-tokenized by the student): what people
  do across tokenizers today. In-process.

Every sampled-token arm (``oracle_tok`` and the four through hooks) uses the same update
(:func:`slime_xvocab.demo.opd.opd_update`: slime's per-token advantage ``-(log pi_s - v)``, PPO clip, KL to the
start); only the teacher value ``v`` differs. Evaluation is the same for
every arm and in-process: greedy accuracy on the held-out problems, and the exact teacher's log-prob of
temperature-1 student answers (reverse KL per byte).
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from slime_xvocab.demo import scoring
from slime_xvocab.demo.exact import ExactTeacher
from slime_xvocab.demo.models import ChatLM
from slime_xvocab.demo.opd import (
    OPDSettings,
    kl_to_start,
    opd_update,
    optimizer_step,
    per_sample_mean,
    slime_args,
)
from slime_xvocab.demo.sample import make_samples
from slime_xvocab.demo.task import is_correct

ARMS = ("ceiling", "oracle_tok", "default", "uniform", "one_to_one", "naive", "sft")
# arm -> (plugin credit mode, chunk split) for the arms that go through the plugin's hooks; naive: stock hooks
HOOK_ARMS = {"default": "student_token", "uniform": "chunk", "one_to_one": "exact", "naive": "naive"}
ARM_LABELS = {
    "ceiling": "dense reverse KL to the exact teacher distribution in student tokens (in-process)",
    "oracle_tok": "sampled-token OPD, each token valued by the exact teacher (in-process)",
    "default": "plugin default: credit_mode student_token (hooks + server)",
    "uniform": "plugin: credit_mode chunk, chunk_split uniform (hooks + server)",
    "one_to_one": "plugin: credit_mode exact, 1:1 tokens only (hooks + server)",
    "naive": "stock slime OPD: student ids sent to the teacher (server)",
    "sft": "SFT on teacher samples, re-tokenized (in-process)",
}


def hook_args(arm: str, teacher_url: str, student_dir, teacher_dir, cfg: OPDSettings, template_kwargs: dict):
    """slime-style args for an arm that goes through hooks (``None`` for the in-process arms)."""
    if arm not in HOOK_ARMS:
        return None
    return slime_args(HOOK_ARMS[arm], teacher_url, student_dir, teacher_dir, cfg,
                      teacher_template_kwargs=template_kwargs)


@torch.no_grad()
def evaluate(student: ChatLM, exact: ExactTeacher, problems: Sequence, seed: int, max_new: int,
             chunk: int = 256) -> dict[str, float]:
    """Held-out metrics, the same for every arm.

    ``accuracy``: greedy answer == the sum. ``reverse_kl_per_byte``: over temperature-1 answers (one per problem,
    sampled with ``seed``), ``sum(log pi_student(answer) - log P_teacher(answer))`` / answer bytes (end of turn =
    one byte), the teacher's log-prob exact over all its tokenizations (off-format answers: along its own
    tokenization, a lower bound). ``off_format_share``: sampled answers with a token that is neither a digit nor
    the end of turn.
    """
    gen = torch.Generator().manual_seed(seed)
    msgs = [p.messages() for p in problems]
    prompts = [student.prompt_ids(m) for m in msgs]
    correct, s_lp, t_lp, n_bytes, n_tok, off, ended, s_correct = 0, 0.0, 0.0, 0, 0, 0, 0, 0
    for s in range(0, len(prompts), chunk):
        ps, pr, ms = prompts[s : s + chunk], problems[s : s + chunk], msgs[s : s + chunk]
        greedy, _, _ = student.sample(ps, max_new, temperature=0.0)
        correct += sum(is_correct(p, student.decode_response(r)) for p, r in zip(pr, greedy))
        resp, lps, fin = student.sample(ps, max_new, temperature=1.0, generator=gen)
        scores = exact.score(ms, resp)
        for p, r, lp, f, sc in zip(pr, resp, lps, fin, scores):
            s_lp += float(np.sum(lp))
            t_lp += sc.text_logprob
            n_bytes += sc.n_bytes
            n_tok += len(r)
            off += sc.off_format
            ended += f
            s_correct += is_correct(p, student.decode_response(r))
    n = len(problems)
    return {
        "accuracy": correct / n,
        "sampled_accuracy": s_correct / n,
        "reverse_kl_per_byte": (s_lp - t_lp) / max(1, n_bytes),
        "reverse_kl_per_token": (s_lp - t_lp) / max(1, n_tok),
        "teacher_lp_per_byte": t_lp / max(1, n_bytes),
        "off_format_share": off / n,
        "eot_share": ended / n,
    }


def _exact_values(exact: ExactTeacher, samples) -> None:
    from slime_xvocab.demo.sample import response_ids

    scores = exact.score([s.metadata["messages"] for s in samples], [response_ids(s) for s in samples])
    for s, sc in zip(samples, scores):
        v = sc.values.copy()
        own = np.asarray(s.rollout_log_probs, dtype=np.float64)
        v[np.isnan(v)] = own[np.isnan(v)]  # no teacher value: delta 0 (the plugin's xvocab_unscored: keep)
        s.teacher_log_probs = v.astype(np.float32)


def covered_share(samples) -> float:
    """Share of response tokens that got a teacher value (a value equal to the student's own log-prob is none)."""
    flags = [~np.isclose(np.asarray(s.teacher_log_probs, dtype=np.float32),
                         np.asarray(s.rollout_log_probs, dtype=np.float32), atol=1e-6, rtol=0) for s in samples]
    return float(np.mean(np.concatenate(flags))) if flags else float("nan")


def _response_log_softmax(lm: ChatLM, prompts, responses) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-distribution over the model vocabulary ("other" excluded) at every response position: [B, R, V]."""
    ids, att, pos, P, rmask = lm._batch(prompts, responses)
    R = rmask.shape[1]
    hidden = lm.model.get_decoder()(input_ids=ids, attention_mask=att, position_ids=pos).last_hidden_state
    logits = lm.model.get_output_embeddings()(hidden[:, P - 1 : P + R - 1])[..., : lm.vocab.other].float()
    return torch.log_softmax(logits, -1), rmask


def dense_update(student: ChatLM, ref: ChatLM, opt, samples, targets: list[dict], cfg: OPDSettings,
                 floor: float = -27.6) -> dict[str, float]:
    """One step of dense reverse KL, ``sum_y pi(y) (log pi(y) - log q(y))`` at every visited position, against the
    exact teacher distribution ``q`` in student tokens (digits and end of turn; the other tokens as one tail
    bucket), plus the same KL to the start as the OPD arms; per-sample token mean, then the batch mean."""
    from slime_xvocab.demo.sample import prompt_ids, response_ids

    prompts = [prompt_ids(s) for s in samples]
    resps = [response_ids(s) for s in samples]
    student.model.train()
    logp, _ = _response_log_softmax(student, prompts, resps)
    B, R, V = logp.shape
    logq = torch.full((B, R, V), float("nan"))
    tail = torch.zeros(B, R)
    mask = torch.zeros(B, R)
    for i, t in enumerate(targets):
        pos = t["positions"]
        logq[i, pos] = torch.as_tensor(t["logq"], dtype=torch.float32)
        tail[i, pos] = torch.as_tensor(t["log_tail"], dtype=torch.float32)
        mask[i, pos] = 1.0
    support = ~torch.isnan(logq)
    logq = torch.nan_to_num(logq, nan=0.0).clamp(min=floor)
    tail = tail.clamp(min=floor)
    pi = logp.exp()
    kl_support = (pi * (logp - logq) * support).sum(-1)
    pi_tail = (pi * ~support).sum(-1)
    log_pi_tail = torch.log(pi_tail.clamp(min=1e-30))
    kl = kl_support + pi_tail * (log_pi_tail - tail)
    # KL to the starting policy on the sampled tokens (k3), as in the OPD arms
    idx = torch.from_numpy(np.stack([np.pad(student.vocab.to_model(r), (0, R - len(r))) for r in resps])).long()
    idx = idx.clamp(max=V - 1)
    new = logp.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        ref_lp, _ = ref.response_logprobs(prompts, resps)
    k3 = kl_to_start(ref_lp, new)
    loss = per_sample_mean(kl + cfg.kl_to_start_coef * k3, mask)
    optimizer_step(student, opt, loss)
    tok = mask.sum().clamp(min=1)
    return {"loss": float(loss.detach()), "dense_reverse_kl": float((kl.detach() * mask).sum() / tok),
            "kl_to_start": float((k3.detach() * mask).sum() / tok)}


def sft_update(student: ChatLM, opt, examples, clip: float = 1.0) -> dict[str, float]:
    """One NLL step on ``(prompt_ids, answer_ids)`` pairs (per-sample token mean, as slime's sft loss)."""
    student.model.train()
    logp, mask = student.response_logprobs([e[0] for e in examples], [e[1] for e in examples])
    loss = per_sample_mean(-logp, mask)
    optimizer_step(student, opt, loss, clip)
    return {"loss": float(loss.detach())}


def _copy(lm: ChatLM) -> ChatLM:
    """A trainable copy of ``lm``: the model is copied, the tokenizer shared (deep-copying it takes seconds)."""
    return ChatLM(lm.tokenizer, lm.vocab, copy.deepcopy(lm.model), lm.eot_id, dict(lm.template_kwargs))


@dataclass
class ArmRun:
    """What :func:`run_arm` needs besides the arm and the seed."""

    cfg: OPDSettings
    student: ChatLM
    teacher: ChatLM
    exact: ExactTeacher
    train: Sequence
    held_out: Sequence
    args: object = None  # slime-style args for the hook arms


def run_arm(arm: str, seed: int, run: ArmRun, log: Callable[[str], None] = print) -> dict:
    """Train one arm from the shared start for ``cfg.opd_steps`` steps of ``cfg.opd_batch`` samples.

    ``seed`` drives the batch order, the student's (or, for ``sft``, the teacher's) sampling and the evaluation
    sample; every arm with the same seed gets the same batches and the same evaluation draws.

    Returns:
        ``{"arm", "seed", "history": [{"step", **evaluate(...), **train stats}], "coverage", "seconds"}``.
    """
    cfg = run.cfg
    t0 = time.time()
    torch.manual_seed(seed)
    student, ref = _copy(run.student), _copy(run.student)
    opt = torch.optim.AdamW(student.model.parameters(), lr=cfg.opd_lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, cfg.opd_warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    loop = asyncio.new_event_loop()
    history: list[dict] = []
    cover: list[float] = []
    last: dict = {}
    eval_steps = sorted({0, cfg.opd_steps, *range(0, cfg.opd_steps, max(1, cfg.eval_every))})
    try:
        for step in range(cfg.opd_steps + 1):
            if step in eval_steps:
                m = evaluate(student, run.exact, run.held_out, 10_000 + seed, cfg.max_new_tokens)
                history.append({"step": step, "seconds": time.time() - t0, **m, **last})
                log(f"{arm:<10} seed {seed} step {step:>4}/{cfg.opd_steps}: acc {m['accuracy']:.1%}  "
                    f"rKL/byte {m['reverse_kl_per_byte']:.3f}  off-format {m['off_format_share']:.0%}  "
                    f"({time.time() - t0:.0f}s)")
            if step == cfg.opd_steps:
                break
            batch = [run.train[i] for i in rng.integers(0, len(run.train), cfg.opd_batch)]
            if arm == "sft":
                t_prompts = [run.teacher.prompt_ids(p.messages()) for p in batch]
                resp, _, fin = run.teacher.sample(t_prompts, cfg.max_new_tokens, temperature=1.0, generator=gen)
                examples = []
                for p, r, f in zip(batch, resp, fin):
                    text = run.teacher.decode_response(r)
                    ids = student.answer_ids(text) if f else student.tokenizer.encode(text, add_special_tokens=False)
                    if ids:
                        examples.append((student.prompt_ids(p.messages()), ids))
                last = sft_update(student, opt, examples)
                cover.append(1.0)
            else:
                samples = make_samples(student, batch, cfg.max_new_tokens, gen, "messages",
                                       start_index=step * cfg.opd_batch)
                samples = [s for s in samples if s.response_length > 0]
                if arm == "ceiling":
                    from slime_xvocab.demo.sample import response_ids

                    targets = run.exact.dense_targets([s.metadata["messages"] for s in samples],
                                                      [response_ids(s) for s in samples])
                    cover.append(sum(len(t["positions"]) for t in targets)
                                 / max(1, sum(s.response_length for s in samples)))
                    last = dense_update(student, ref, opt, samples, targets, cfg)
                else:
                    if arm == "oracle_tok":
                        _exact_values(run.exact, samples)
                    else:
                        scoring.score_samples(run.args, samples, loop)
                    cover.append(covered_share(samples))
                    last = {k: v for k, v in opd_update(student, ref, opt, samples, cfg).items() if k != "coverage"}
            sched.step()
    finally:
        if run.args is not None:
            from slime_xvocab.demo.opd import _close_plugin_runtime

            _close_plugin_runtime(run.args, loop)
        loop.close()
    hooks = [run.args.custom_rm_path, run.args.custom_reward_post_process_path] if run.args is not None \
        else "in-process"
    return {"arm": arm, "seed": seed, "history": history, "coverage": float(np.mean(cover)) if cover else 1.0,
            "hooks": hooks, "seconds": time.time() - t0}
