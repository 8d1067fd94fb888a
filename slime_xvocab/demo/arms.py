"""The comparison the demo exists for: every way of distilling across tokenizers, at equal budget, paired seeds.

Arms (names chosen not to clash with the plugin's settings):

* ``ceiling``: what distillation gives when the teacher speaks the student's tokenizer: a dense reverse KL,
  ``sum_y pi(y) (log pi(y) - log q(y))`` at every position the student visits, against the teacher's **exact**
  distribution ``q`` over the student's next token (:mod:`slime_xvocab.demo.exact`: every teacher path, no
  top-k). In-process. This is the headline's reference.
* ``dense``: the plugin's dense distillation (``xvocab_dense: true``): the teacher's top-20 projected onto the
  student's vocabulary by the plugin (:mod:`slime_xvocab.dense`, through the real hooks and the reference
  teacher server on loopback), trained with the **same loss** as ``ceiling``. Its recovery of the ceiling is
  what the plugin's top-k projection loses against the exact distribution.
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

``ceiling`` and ``dense`` use the same update (:func:`dense_update`: the plugin's bucket divergence,
:func:`slime_xvocab.dense_loss.bucket_divergence`); only the teacher distribution differs. Every sampled-token
arm (``oracle_tok`` and the four through hooks) uses the same update (:func:`slime_xvocab.demo.opd.opd_update`:
slime's per-token advantage ``-(log pi_s - v)``, PPO clip, KL to the start); only the teacher value ``v``
differs. Every arm gets the same learning-rate schedule (warm-up, then cosine decay). Evaluation is the same for
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
    lr_factor,
    opd_update,
    optimizer_step,
    per_sample_mean,
    slime_args,
)
from slime_xvocab.demo.sample import make_samples
from slime_xvocab.demo.task import is_correct

ARMS = ("ceiling", "dense", "oracle_tok", "default", "uniform", "one_to_one", "naive", "sft")
# arm -> the plugin's credit mode for the arms that go through the plugin's hooks (dense: plus xvocab_dense);
# naive: slime's stock hooks
HOOK_ARMS = {"dense": "student_token", "default": "student_token", "uniform": "chunk", "one_to_one": "exact",
             "naive": "naive"}
ARM_LABELS = {
    "ceiling": "dense reverse KL to the exact teacher distribution in student tokens (in-process)",
    "dense": "plugin xvocab_dense: the same loss, teacher top-20 projected by the plugin (hooks + server)",
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
                      teacher_template_kwargs=template_kwargs, dense=arm == "dense")


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


LOG_Q_FLOOR = -27.6  # log(1e-12): a teacher probability of 0 (a token it cannot write there) stays finite


def exact_buckets(targets: Sequence[dict]) -> list[dict]:
    """The exact teacher's targets (:meth:`ExactTeacher.dense_targets`) as buckets for :func:`dense_update`.

    Listed: every token of the exact support (the student's digits and end of turn), at log-probability
    ``max(log q, LOG_Q_FLOOR)``; the tail: the teacher's mass of everything else.
    """
    out = []
    for t in targets:
        logq = np.asarray(t["logq"], dtype=np.float64)
        cols = np.flatnonzero(~np.isnan(logq).all(axis=0))
        ids = np.broadcast_to(cols, (len(logq), len(cols))).copy()
        out.append({"positions": np.asarray(t["positions"], dtype=np.int64), "ids": ids,
                    "log_q": np.maximum(logq[:, cols], LOG_Q_FLOOR),
                    "tail": np.exp(np.asarray(t["log_tail"], dtype=np.float64))})
    return out


def plugin_buckets(samples, vocab) -> list[dict]:
    """The plugin's dense targets (``xvocab_dense``, left on each sample by the hooks) in the compact vocabulary.

    The hooks list up to ``xvocab_dense_top_k`` real student ids per position plus a tail; an id the demo's
    compact vocabulary lacks (the student cannot write it) joins the tail; positions without a target
    (``valid`` False) are left out.
    """
    from slime_xvocab.dense_transport import sample_targets

    out = []
    for s in samples:
        t = sample_targets(s)
        if t is None:
            raise RuntimeError(f"sample {s.index}: the hooks left no dense targets (is xvocab_dense set?)")
        pos = np.flatnonzero(t.valid)
        real = t.ids[pos].astype(np.int64)
        ids = vocab.to_model(real.ravel()).reshape(real.shape) if real.size else real
        keep = (real >= 0) & (ids < vocab.other)
        lq = t.log_probs[pos].astype(np.float64)
        tail = t.tail[pos].astype(np.float64) + np.where((real >= 0) & ~keep, np.exp(lq), 0.0).sum(axis=1)
        out.append({"positions": pos, "ids": np.where(keep, ids, -1), "log_q": np.where(keep, lq, 0.0),
                    "tail": np.minimum(tail, 1.0)})
    return out


def dense_update(student: ChatLM, ref: ChatLM, opt, samples, targets: list[dict], cfg: OPDSettings
                 ) -> dict[str, float]:
    """One step of the plugin's dense loss (:func:`slime_xvocab.dense_loss.bucket_divergence`, reverse KL) at
    every position with a target, plus the same KL to the start as the OPD arms; per-sample token mean, then
    the batch mean.

    ``targets``: per sample ``{"positions" [n], "ids" [n, K] compact model ids (-1: padding), "log_q" [n, K],
    "tail" [n]}`` (:func:`exact_buckets` for the ceiling, :func:`plugin_buckets` for the plugin's arm): the
    divergence is over the listed tokens plus one bucket for every other token, so both arms run the same loss
    and differ only in the teacher's distribution.
    """
    from slime_xvocab.demo.sample import prompt_ids, response_ids
    from slime_xvocab.dense_loss import bucket_divergence

    prompts = [prompt_ids(s) for s in samples]
    resps = [response_ids(s) for s in samples]
    student.model.train()
    logp, _ = _response_log_softmax(student, prompts, resps)
    B, R, _ = logp.shape
    rows = [(i, int(j)) for i, t in enumerate(targets) for j in t["positions"]]
    mask = torch.zeros(B, R)
    kl = torch.zeros(B, R)
    if rows:
        b_idx = torch.tensor([i for i, _ in rows])
        r_idx = torch.tensor([j for _, j in rows])
        width = max(t["ids"].shape[1] for t in targets)
        ids = np.full((len(rows), width), -1, dtype=np.int64)
        log_q = np.zeros((len(rows), width))
        at = 0
        for t in targets:
            n, k = t["ids"].shape
            ids[at : at + n, :k], log_q[at : at + n, :k] = t["ids"], t["log_q"]
            at += n
        tail = np.concatenate([t["tail"] for t in targets])
        div, _ = bucket_divergence(logp[b_idx, r_idx], torch.from_numpy(ids), torch.from_numpy(log_q).float(),
                                   torch.from_numpy(tail).float())
        kl = kl.index_put((b_idx, r_idx), div)
        mask[b_idx, r_idx] = 1.0
    # KL to the starting policy on the sampled tokens (k3), as in the OPD arms
    V = logp.shape[-1]
    idx = torch.from_numpy(np.stack([np.pad(student.vocab.to_model(r), (0, R - len(r))) for r in resps])).long()
    new = logp.gather(-1, idx.clamp(max=V - 1).unsqueeze(-1)).squeeze(-1)
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
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
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
                if arm in ("ceiling", "dense"):
                    from slime_xvocab.demo.sample import response_ids

                    if arm == "ceiling":
                        targets = exact_buckets(run.exact.dense_targets(
                            [s.metadata["messages"] for s in samples], [response_ids(s) for s in samples]))
                    else:
                        scoring.score_samples(run.args, samples, loop)
                        targets = plugin_buckets(samples, student.vocab)
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
