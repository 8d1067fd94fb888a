"""The demo's single-process OPD reference loop: teacher/student preparation, rollout, hooks, PPO, eval.

At scale the same hooks run inside slime (rollout on SGLang, training on Megatron); here one process plays
both parts so that the whole pipeline runs on a laptop CPU in minutes.
"""

from __future__ import annotations

import asyncio
import copy
import math
import time
from argparse import Namespace
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from slime_xvocab.demo import scoring
from slime_xvocab.demo.evaluation import evaluate_task
from slime_xvocab.demo.models import ChatLM, ModelSize, build_model, numeracy_init, settings_hash, sft
from slime_xvocab.demo.sample import Sample, make_samples, prompt_ids, response_ids
from slime_xvocab.demo.task import Problem, all_problems, split_problems
from slime_xvocab.demo.vocab import CompactVocab

MODES = ("chunk", "student_token", "exact", "naive")


@dataclass
class OPDSettings:
    """The OPD loop's knobs, shared by both scenarios (slime's flag in brackets where slime has one)."""

    seed: int = 0  # data split, model initialisation, and (unless opd_seed is set) the OPD run
    opd_seed: int | None = None  # only the OPD run's sampling and batch order: same models, another draw
    opd_steps: int = 100
    opd_batch: int = 64  # rollouts per step (--rollout-batch-size x --n-samples-per-prompt 1)
    opd_lr: float = 3e-4
    opd_warmup_steps: int = 20  # linear lr warm-up (--lr-warmup-iters); Adam's first steps are noisy
    opd_kl_coef: float = 1.0  # (--opd-kl-coef)
    kl_to_start_coef: float = 0.0  # k3 KL to the start (--use-kl-loss --kl-loss-coef, --kl-loss-type low_var_kl)
    eps_clip: float = 0.2  # (--eps-clip)
    normalize_advantages: bool = True  # (--normalize-advantages)
    max_new_tokens: int = 6  # (--rollout-max-response-len)
    eval_every: int = 25


@dataclass
class DemoConfig(OPDSettings):
    """Every knob of the default (arithmetic) scenario; the defaults are the default scenario."""

    lo: int = 0
    hi: int = 49
    n_eval: int = 500
    # after the warm-up the learning rate follows a cosine down to this fraction of opd_lr at the last step
    # (--lr-decay-style cosine --min-lr), so that the last evaluation reads a settled student
    opd_min_lr_ratio: float = 0.1
    teacher_family: str = "llama3_1"
    student_family: str = "qwen3"
    teacher_size: ModelSize = field(default_factory=lambda: ModelSize(128, 2, 4, 512))
    student_size: ModelSize = field(default_factory=lambda: ModelSize(128, 2, 4, 512))
    teacher_steps: int = 1200
    teacher_lr: float = 3e-3
    student_steps: int = 200
    student_lr: float = 3e-3
    student_frac: float = 0.3
    sft_batch: int = 128

    def cache_key(self, which: str) -> str:
        d = asdict(self)
        keep = ["lo", "hi", "n_eval", "seed", f"{which}_family", f"{which}_size", f"{which}_steps", f"{which}_lr",
                "sft_batch"] + (["student_frac"] if which == "student" else [])
        # "init" versions the starting point (models.deterministic_init): older caches were initialised by
        # transformers and differ between its minor versions
        return f"{which}-{settings_hash({'init': 'seeded-v1', **{k: d[k] for k in keep}})}"


def default_config(student_family: str = "qwen3", seed: int = 0) -> DemoConfig:
    """The default scenario in one direction. The student's SFT learning rate is set per direction so that both
    students start weak (held-out greedy accuracy 31 % for the Qwen3 student at 1e-3, 22 % for the Llama-3.1
    student at 3e-3; at 3e-3 the Qwen3 student starts at 81 %, too close to the teacher to measure recovery)."""
    teacher_family = "qwen3" if student_family == "llama3_1" else "llama3_1"
    return DemoConfig(seed=seed, student_family=student_family, teacher_family=teacher_family,
                      student_lr=1e-3 if student_family == "qwen3" else 3e-3)


TINY = dict(
    lo=0, hi=19, n_eval=32, teacher_size=ModelSize(64, 1, 4, 256), student_size=ModelSize(64, 1, 4, 256),
    teacher_steps=150, student_steps=60, student_lr=3e-3, opd_steps=4, opd_batch=8, eval_every=2, sft_batch=32,
)


FAMILY = {
    "qwen3": ("qwen3", "<|im_end|>", {"enable_thinking": False}),
    "llama3_1": ("llama", "<|eot_id|>", {}),
}


def _number_ids(tok) -> list[int]:
    """Real ids of every 1-3 digit number token the tokenizer has as a single token."""
    vocab = tok.get_vocab()
    strs = [str(i) for i in range(10)] + [f"{i:02d}" for i in range(100)] + [f"{i:03d}" for i in range(1000)]
    return [vocab[s] for s in strs if s in vocab]


def _new_lm(family: str, problems: Sequence[Problem], size: ModelSize, seed: int) -> ChatLM:
    from slime_xvocab.assets import load_tokenizer

    tok = load_tokenizer(family)
    arch, eot, kw = FAMILY[family]
    eot_id = tok.convert_tokens_to_ids(eot)
    probe = ChatLM(tok, CompactVocab([eot_id]), None, eot_id, kw)
    corpus = [probe.prompt_ids(p.messages()) + probe.answer_ids(p.answer) for p in problems]
    vocab = CompactVocab.from_corpus(corpus, _number_ids(tok) + [eot_id])
    return ChatLM(tok, vocab, build_model(arch, vocab.size, size, seed), eot_id, kw)


def prepare_model(
    cfg: DemoConfig, which: str, cache_root: Path, log: Callable[[str], None], on_step: Callable | None = None
) -> tuple[ChatLM, Path, bool]:
    """Train (or load from the cache) the teacher or the weak student.

    The teacher gets SFT on every problem (it plays a strong pretrained model) with a numeracy prior; the
    student gets a short SFT on ``student_frac`` of the training split only, so it starts weak.

    Returns:
        ``(lm, model_dir, cached)``.
    """
    out = cache_root / cfg.cache_key(which)
    if (out / "xvocab_demo.json").is_file():
        return ChatLM.load(out), out, True
    problems = all_problems(cfg.lo, cfg.hi)
    train, _ = split_problems(problems, cfg.n_eval, cfg.seed)
    family = cfg.teacher_family if which == "teacher" else cfg.student_family
    size = cfg.teacher_size if which == "teacher" else cfg.student_size
    lm = _new_lm(family, problems, size, cfg.seed + (0 if which == "teacher" else 1))
    numeracy_init(lm)
    if which == "teacher":
        data, steps, lr = problems, cfg.teacher_steps, cfg.teacher_lr
    else:
        data = train[: max(1, int(len(train) * cfg.student_frac))]
        steps, lr = cfg.student_steps, cfg.student_lr
    examples = [(lm.prompt_ids(p.messages()), lm.answer_ids(p.answer)) for p in data]
    sft(lm, examples, steps, cfg.sft_batch, lr, cfg.seed, on_step)
    tmp = out.with_name(out.name + f".tmp{time.time_ns()}")
    lm.save(tmp)
    try:
        tmp.rename(out)
    except OSError:  # a concurrent run won the race; use its copy
        pass
    return lm, out, False


# ---------------------------------------------------------------------------------------------- rollout
def slime_args(mode: str, teacher_url: str, student_dir: Path, teacher_dir: Path, cfg: OPDSettings, *,
               teacher_template_kwargs: dict | None = None, teacher_end_of_turn: str | None = None,
               unscored: str = "keep", dense: bool = False) -> Namespace:
    """An argparse namespace with slime's attribute names plus the plugin's ``xvocab_*`` keys (``dense``: also
    ``xvocab_dense`` with the default top-k, the targets left on each sample by the hooks)."""
    rm, post = scoring.hook_paths(mode)
    return Namespace(
        # slime's own flags, as the OPD launch scripts set them
        rm_url=teacher_url.rstrip("/") + "/generate", custom_rm_path=rm, custom_reward_post_process_path=post,
        use_opd=True, opd_type="sglang", opd_kl_coef=cfg.opd_kl_coef, rollout_temperature=1.0,
        n_samples_per_prompt=1, hf_checkpoint=str(student_dir), reward_key=None, group_rm=False,
        eps_clip=cfg.eps_clip, rollout_max_response_len=cfg.max_new_tokens, metadata_key="metadata",
        # the plugin's keys (docs/configuration.md)
        xvocab_teacher_urls=[teacher_url], xvocab_teacher_tokenizer=str(teacher_dir),
        xvocab_credit_mode={"exact": "exact", "student_token": "student_token"}.get(mode, "chunk"),
        xvocab_messages_key="messages", xvocab_chunk_split="uniform",
        xvocab_fallback="student", xvocab_max_failed_fraction=0.5,
        xvocab_template_kwargs=dict(teacher_template_kwargs or {}), xvocab_end_of_turn=teacher_end_of_turn,
        xvocab_unscored=unscored, xvocab_dense=dense,
    )


# ------------------------------------------------------------------------------------------------ train
def lr_factor(step: int, cfg: OPDSettings) -> float:
    """The learning rate at ``step`` as a fraction of ``cfg.opd_lr``: linear warm-up, then (for a
    :class:`DemoConfig`) a cosine down to ``opd_min_lr_ratio`` at the last step, as slime's ``--lr-decay-style
    cosine --min-lr``."""
    warm = max(1, cfg.opd_warmup_steps)
    if step < warm:
        return (step + 1) / warm
    floor = getattr(cfg, "opd_min_lr_ratio", 1.0)
    span = max(1, cfg.opd_steps - warm)
    done = min(1.0, (step - warm) / span)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * done))


def coverage(sample: Sample) -> float:
    """Share of the sample's response tokens that got a teacher signal (the plugin's stats; naive mode: 1)."""
    meta = sample.metadata.get("xvocab", {})
    if "stats" in meta:
        return float(meta["stats"].get("covered_fraction", math.nan))
    return float(meta.get("coverage", math.nan))


def _close_plugin_runtime(args: Namespace, loop: asyncio.AbstractEventLoop) -> None:
    """Close the hooks' HTTP client on the loop it was opened on, then forget the runtime."""
    if args.custom_rm_path == scoring.NAIVE_RM:
        from slime_xvocab.demo import naive

        naive.close(loop)
        return
    if not args.custom_rm_path.startswith("slime_xvocab.hooks"):
        return
    from slime_xvocab import hooks

    entry = hooks._RUNTIMES.get(id(args))
    client = getattr(entry[1], "client", None) if entry else None
    if client is not None and hasattr(client, "aclose"):
        loop.run_until_complete(client.aclose())
    hooks.reset(args)


def kl_to_start(ref_lp: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || pi_start) on the sampled tokens."""
    d = ref_lp - new
    return torch.exp(d) - d - 1


def per_sample_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each sample's loss tokens, then over samples (slime's per-sample mean)."""
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def optimizer_step(student: ChatLM, opt, loss: torch.Tensor, clip: float = 1.0) -> None:
    """Backward, clip the gradient norm, step, and leave the model in eval mode for sampling."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.model.parameters(), clip)
    opt.step()
    student.model.eval()


def opd_update(
    student: ChatLM, ref: ChatLM, opt: torch.optim.Optimizer, samples: Sequence[Sample], cfg: OPDSettings
) -> dict[str, float]:
    """One PPO-clip step with slime's OPD advantage ``A_t = -coef * (log pi_s - log pi_t)`` + KL to start.

    The student log-probs inside the advantage are the recomputed ones (as slime recomputes them with
    Megatron); the ratio is taken against the rollout log-probs. The loss is the per-sample token mean,
    averaged over samples (slime's ``sum_of_sample_mean``).
    """
    prompts = [prompt_ids(s) for s in samples]
    resps = [response_ids(s) for s in samples]
    R = max(s.response_length for s in samples)
    old = torch.zeros(len(samples), R)
    teach = torch.zeros(len(samples), R)
    lmask = torch.zeros(len(samples), R)
    for i, s in enumerate(samples):
        n = s.response_length
        old[i, :n] = torch.tensor(s.rollout_log_probs, dtype=torch.float32)
        teach[i, :n] = torch.as_tensor(np.asarray(s.teacher_log_probs, dtype=np.float32))
        lmask[i, :n] = torch.tensor(s.loss_mask if s.loss_mask is not None else [1] * n, dtype=torch.float32)
    student.model.train()
    new, mask = student.response_logprobs(prompts, resps)
    mask = mask * lmask
    with torch.no_grad():
        ref_lp, _ = ref.response_logprobs(prompts, resps)
    adv = -cfg.opd_kl_coef * (new.detach() - teach)
    if cfg.normalize_advantages:  # slime's --normalize-advantages: whiten over the batch's loss tokens
        mean = (adv * mask).sum() / mask.sum()
        var = (((adv - mean) * mask) ** 2).sum() / mask.sum()
        adv = (adv - mean) / (var.sqrt() + 1e-8) * mask
    ratio = torch.exp(new - old)
    pg = torch.maximum(-ratio * adv, -ratio.clamp(1 - cfg.eps_clip, 1 + cfg.eps_clip) * adv)
    kl = kl_to_start(ref_lp, new)
    loss = per_sample_mean(pg + cfg.kl_to_start_coef * kl, mask)
    optimizer_step(student, opt, loss)
    tok = mask.sum()
    return {
        "loss": float(loss.detach()),
        "train_reverse_kl": float(((new.detach() - teach) * mask).sum() / tok),
        "kl_to_start": float((kl.detach() * mask).sum() / tok),
        "clip_frac": float((((ratio.detach() - 1).abs() > cfg.eps_clip).float() * mask).sum() / tok),
        "coverage": float(np.mean([coverage(s) for s in samples])),
    }


def run_mode(
    mode: str, cfg: OPDSettings, student_init: ChatLM, args: Namespace, train_problems: Sequence[Problem],
    eval_problems: Sequence[Problem], on_progress: Callable[[int, dict], None] | None = None,
    evaluate: Callable = evaluate_task,
) -> dict:
    """OPD from the same starting student, same seed and budget, for one alignment ``mode``.

    ``evaluate(student, eval_problems, args, loop, generator, max_new) -> (metrics, examples)`` runs every
    ``cfg.eval_every`` steps (:func:`~slime_xvocab.demo.evaluation.evaluate_task` or ``evaluate_chat``).

    Returns:
        ``{"history": [{step, **eval metrics, **train metrics}], "examples": {...}, "check": {...},
        "seconds": float}``.
    """
    t0 = time.time()
    seed = cfg.seed if cfg.opd_seed is None else cfg.opd_seed
    torch.manual_seed(seed)
    student = copy.deepcopy(student_init)
    ref = copy.deepcopy(student_init)
    opt = torch.optim.AdamW(student.model.parameters(), lr=cfg.opd_lr, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, cfg.opd_warmup_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    eval_gen_seed = seed + 12345
    loop = asyncio.new_event_loop()
    history: list[dict] = []
    examples: dict = {}
    check: dict = {}
    last_train: dict = {}
    try:
        for step in range(cfg.opd_steps + 1):
            if step % cfg.eval_every == 0 or step == cfg.opd_steps:
                m, ex = evaluate(student, eval_problems, args, loop, torch.Generator().manual_seed(eval_gen_seed),
                                 cfg.max_new_tokens)
                history.append({"step": step, "seconds": time.time() - t0, **m, **last_train})
                examples[str(step)] = ex
                if on_progress:
                    on_progress(step, history[-1])
            if step == cfg.opd_steps:
                break
            batch = [train_problems[i] for i in rng.integers(0, len(train_problems), cfg.opd_batch)]
            samples = make_samples(student, batch, cfg.max_new_tokens, gen, args.xvocab_messages_key,
                                   start_index=step * cfg.opd_batch)
            samples = [s for s in samples if s.response_length > 0]
            scoring.score_samples(args, samples, loop)
            if step == 0:
                check = {
                    "teacher_log_probs_len_ok": all(
                        len(s.teacher_log_probs) == s.response_length for s in samples),
                    "teacher_log_probs_finite": all(
                        bool(np.isfinite(np.asarray(s.teacher_log_probs)).all()) for s in samples),
                    "coverage": float(np.mean([coverage(s) for s in samples])),
                    "min_coverage": float(np.min([coverage(s) for s in samples])),
                    # tokens whose teacher value is the student's own rollout log-prob: OPD delta 0, no signal
                    "no_signal_fraction": float(np.mean(np.concatenate([
                        np.isclose(np.asarray(s.teacher_log_probs, dtype=np.float32),
                                   np.asarray(s.rollout_log_probs, dtype=np.float32), atol=1e-6, rtol=0)
                        for s in samples]))),
                    "hooks": [args.custom_rm_path, args.custom_reward_post_process_path],
                }
            last_train = opd_update(student, ref, opt, samples, cfg)
            sched.step()
            if on_progress:
                on_progress(step + 1, {"train": True, **last_train})
    finally:
        _close_plugin_runtime(args, loop)
        loop.close()
    return {"history": history, "examples": examples, "check": check, "seconds": time.time() - t0}
