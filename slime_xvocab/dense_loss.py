"""Dense distillation loss for slime: ``--loss-type custom_loss --custom-loss-function-path
slime_xvocab.dense_loss.dense_distill_loss``.

At every response position the student's distribution is compared with the teacher's projected one
(:mod:`~slime_xvocab.dense`) over ``K + 1`` buckets: the ``K`` listed student tokens, and one tail bucket
holding everything else (on the student's side, all its other tokens; on the teacher's, the mass its top-k did
not show). With ``p`` the student's bucket probabilities and ``q`` the teacher's::

    reverse_kl  sum_b p_b (log p_b - log q_b)         (default; mode-seeking, what on-policy distillation uses)
    forward_kl  sum_b q_b (log q_b - log p_b)
    jsd         (KL(p || m) + KL(q || m)) / 2,  m = (p + q) / 2

The loss slime trains on is its own policy loss (``policy_loss_function``: PPO clip, TIS, entropy and KL
terms, loss masks, per-token or per-sample means exactly as configured) plus ``xvocab_dense_coef`` times the
divergence reduced with slime's ``sum_of_sample_mean``, so a task reward (or slime's sampled-token OPD term
in the advantages) still trains.

Megatron shards the vocabulary over tensor-parallel ranks (``logits`` is ``[1, T, V / TP]``): the max is
all-reduced, the sums of ``exp`` and the listed tokens' logits are all-reduced with an identity backward (each
rank computes the same loss from the reduced values, so the gradient of a rank's own share is the upstream
gradient), and each rank reads only the listed ids in its own range.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from .dense import DIVERGENCES, DenseTargets
from .errors import ConfigError

__all__ = ["DIVERGENCES", "DenseTargetsMissing", "bucket_divergence", "dense_distill_loss", "dense_term"]

#: The teacher's tail bucket is at least this (then renormalised): a student tail mass against an empty
#: teacher tail would otherwise be an infinite reverse KL.
TAIL_FLOOR = 1e-6
#: Attribute of a sample's ``loss_masks`` tensor on the training side that holds its DenseTargets
#: (:mod:`~slime_xvocab.dense_transport` sets it).
TARGETS_ATTR = "_xvocab_dense"


class DenseTargetsMissing(RuntimeError):
    """A micro-batch reached the dense loss without its targets: never trained on silently."""


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) forward, identity backward: every rank computes the same loss from the sum."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


def _sum_over(x: torch.Tensor, group: Any) -> torch.Tensor:
    return x if group is None else _SumOverRanks.apply(x, group)


def bucket_divergence(
    logits: torch.Tensor,
    ids: torch.Tensor,
    log_q: torch.Tensor,
    tail: torch.Tensor,
    *,
    kind: str = "reverse_kl",
    vocab_start: int = 0,
    group: Any = None,
    tail_floor: float = TAIL_FLOOR,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Divergence between the student's and the teacher's distributions over ``K + 1`` buckets, per row.

    Args:
        logits: float ``[R, V_local]``: the student's logits for this rank's vocabulary slice (temperature
            already applied).
        ids: int ``[R, K]``: global student ids of the listed buckets, ``-1`` for padding (unique per row).
        log_q: float ``[R, K]``: the teacher's log-probabilities of ``ids`` (ignored where ``ids`` is -1).
        tail: float ``[R]``: the teacher's tail mass (floored at ``tail_floor``, then all of ``q``
            renormalised).
        kind: one of :data:`DIVERGENCES`.
        vocab_start: first global id of this rank's slice.
        group: the tensor-parallel process group (None: the whole vocabulary is here).

    Returns:
        ``(divergence [R], student tail mass [R])``; differentiable in ``logits``.
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {kind!r}")
    z = logits.float()
    rows, v_local = z.shape
    with torch.no_grad():
        top = z.max(dim=-1).values
        if group is not None:
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    shifted = z - top[:, None]
    ids = ids.long()
    listed = ids >= 0
    local = ids - vocab_start
    mine = listed & (local >= 0) & (local < v_local)
    safe = torch.where(mine, local, torch.zeros_like(local))
    support = torch.zeros_like(z, dtype=torch.bool)
    r_idx = torch.arange(rows, device=z.device)[:, None].expand_as(safe)
    support[r_idx[mine], safe[mine]] = True
    e = shifted.exp()
    total = _sum_over(e.sum(-1), group)
    rest = _sum_over(e.masked_fill(support, 0.0).sum(-1), group)
    picked = _sum_over(torch.where(mine, shifted.gather(1, safe), torch.zeros_like(shifted[:, :1])), group)
    log_total = total.log()
    log_p = torch.cat([picked - log_total[:, None], (rest.clamp_min(1e-30).log() - log_total)[:, None]], dim=1)
    # The teacher's buckets, the tail floored and everything renormalised.
    q_tail = tail.to(z).clamp(min=tail_floor)
    lq = torch.cat([log_q.to(z), q_tail.log()[:, None]], dim=1)
    mask = torch.cat([listed, torch.ones_like(listed[:, :1])], dim=1)
    lq = lq.masked_fill(~mask, float("-inf"))
    lq = lq - torch.logsumexp(lq, dim=1, keepdim=True)
    p = log_p.exp().masked_fill(~mask, 0.0)
    q = lq.exp().masked_fill(~mask, 0.0)
    lp_safe = log_p.masked_fill(~mask, 0.0)
    lq_safe = lq.masked_fill(~mask, 0.0)
    if kind == "reverse_kl":
        div = (p * (lp_safe - lq_safe)).sum(-1)
    elif kind == "forward_kl":
        div = (q * (lq_safe - lp_safe)).sum(-1)
    else:
        lm = torch.log((p + q).clamp_min(1e-30) / 2)
        div = 0.5 * (p * (lp_safe - lm)).sum(-1) + 0.5 * (q * (lq_safe - lm)).sum(-1)
    return div, log_p[:, -1].exp()


# --------------------------------------------------------------------------------------------------
# slime's custom loss


def _slime_policy_loss() -> Callable:
    from slime.backends.megatron_utils.loss import policy_loss_function

    return policy_loss_function


def _parallel_state() -> tuple[Any, int, int, int]:
    """(tensor-parallel group, its rank, its size, context-parallel size); no Megatron: one process."""
    try:
        from megatron.core import mpu
    except ImportError:
        return None, 0, 1, 1
    tp = mpu.get_tensor_model_parallel_world_size()
    group = mpu.get_tensor_model_parallel_group() if tp > 1 else None
    return group, mpu.get_tensor_model_parallel_rank(), tp, mpu.get_context_parallel_world_size()


def targets_of(batch: dict) -> list[DenseTargets]:
    """The DenseTargets of every sample of a micro-batch (attached to its ``loss_masks`` tensors).

    Raises:
        DenseTargetsMissing: a sample has none, or targets of the wrong length.
    """
    out = []
    for k, (mask, length) in enumerate(zip(batch["loss_masks"], batch["response_lengths"], strict=True)):
        targets = getattr(mask, TARGETS_ATTR, None)
        if not isinstance(targets, DenseTargets):
            raise DenseTargetsMissing(
                f"sample {k} of this micro-batch reached slime_xvocab.dense_loss without dense targets. They "
                "travel from the rollout to the loss through slime_xvocab.dense_transport: set "
                "--rollout-data-postprocess-path slime_xvocab.dense_transport.attach_dense_targets and "
                "xvocab_dense: true (docs/dense.md)"
            )
        if targets.n != int(length):
            raise DenseTargetsMissing(f"sample {k}: dense targets cover {targets.n} positions, response_length "
                                      f"is {int(length)}")
        out.append(targets)
    return out


def dense_term(
    logits: torch.Tensor,
    targets: Sequence[DenseTargets],
    total_lengths: Sequence[int],
    response_lengths: Sequence[int],
    *,
    kind: str = "reverse_kl",
    temperature: float = 1.0,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    group: Any = None,
    chunk_rows: int = -1,
) -> dict[str, torch.Tensor]:
    """Per-token dense divergence of one packed micro-batch (context-parallel size 1, slime's layout).

    Args:
        logits: ``[1, T, V_local]``: slime's packed logits; row ``t`` predicts token ``t + 1``.
        targets: one :class:`~slime_xvocab.dense.DenseTargets` per sample.
        total_lengths, response_lengths: per sample, as in slime's batch.
        kind, vocab_start, group: as :func:`bucket_divergence`; ``vocab_size``: the model's (padded) vocabulary
            over all ranks (listed ids at or above it are dropped); ``temperature``: slime's rollout temperature.
        chunk_rows: above 0, rows are processed this many at a time and recomputed in the backward
            (activation checkpointing), so only one chunk's ``[rows, V_local]`` intermediates are alive
            (slime's ``--log-probs-chunk-size``); -1: all at once.

    Returns:
        Per-token tensors over all response tokens, concatenated like slime's ``log_probs``: ``divergence``
        (0 where no target), ``student_tail``, ``teacher_tail`` (0 where no target) and ``valid`` (float).
    """
    z = logits.squeeze(0)
    if temperature != 1.0:
        z = z / temperature
    rows, end = [], 0
    for total, length in zip(total_lengths, response_lengths, strict=True):
        end += int(total)
        start = end - int(length)
        rows.append(z[start - 1:end - 1])
    z = torch.cat(rows, dim=0) if rows else z[:0]
    device = z.device
    if targets:
        ids = torch.from_numpy(np.concatenate([t.ids for t in targets])).to(device)
        log_q = torch.from_numpy(np.concatenate([t.log_probs for t in targets])).to(device)
        tail = torch.from_numpy(np.concatenate([t.tail for t in targets])).to(device)
        valid = torch.from_numpy(np.concatenate([t.valid for t in targets])).to(device)
    else:
        ids = torch.zeros((0, 1), dtype=torch.long, device=device)
        log_q = torch.zeros((0, 1), device=device)
        tail = torch.zeros(0, device=device)
        valid = torch.zeros(0, dtype=torch.bool, device=device)
    if vocab_size is not None:  # an id the model has no logit for cannot be compared: drop it (q renormalises)
        ids = torch.where(ids < vocab_size, ids.long(), torch.full_like(ids.long(), -1))
    def run(z_part, ids_part, log_q_part, tail_part):
        return bucket_divergence(z_part, ids_part, log_q_part, tail_part, kind=kind, vocab_start=vocab_start,
                                 group=group)

    if chunk_rows > 0 and z.size(0) > chunk_rows and z.requires_grad:
        parts = [checkpoint(run, z[a:a + chunk_rows], ids[a:a + chunk_rows], log_q[a:a + chunk_rows],
                            tail[a:a + chunk_rows], use_reentrant=False) for a in range(0, z.size(0), chunk_rows)]
        div, student_tail = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    else:
        div, student_tail = run(z, ids, log_q, tail)
    zero = torch.zeros_like(div)
    return {
        "divergence": torch.where(valid, div, zero),
        "student_tail": torch.where(valid, student_tail, zero).detach(),
        "teacher_tail": torch.where(valid, tail.to(div), zero),
        "valid": valid.to(div),
    }


def dense_distill_loss(
    args: Any,
    batch: dict,
    logits: torch.Tensor,
    sum_of_sample_mean: Callable[[torch.Tensor], torch.Tensor],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """slime ``--custom-loss-function-path``: slime's policy loss plus ``xvocab_dense_coef`` x dense divergence.

    Args:
        args: slime's args (``xvocab_dense_*`` settings on it).
        batch: slime's micro-batch (``loss_masks`` carry the dense targets, see
            :mod:`~slime_xvocab.dense_transport`; ``total_lengths``, ``response_lengths``, and everything
            ``policy_loss_function`` reads).
        logits: ``[1, T, V / TP]`` float32.
        sum_of_sample_mean: slime's reducer (loss masks, per-token or per-sample means).

    Returns:
        ``(loss, metrics)``: slime's metrics plus ``dense_kl`` (the configured divergence), ``dense_teacher_tail``,
        ``dense_student_tail`` and ``dense_valid`` (fraction of loss tokens with a target), each reduced
        with ``sum_of_sample_mean``.

    Raises:
        DenseTargetsMissing: a sample without targets; ConfigError: context parallelism.
    """
    from .hooks import get_config

    config = get_config(args)
    group, rank, tp, cp = _parallel_state()
    if cp != 1:
        raise ConfigError(f"slime_xvocab.dense_loss supports context-parallel size 1, this run has {cp}")
    loss, metrics = _slime_policy_loss()(args, batch, logits, sum_of_sample_mean)
    terms = dense_term(
        logits, targets_of(batch), batch["total_lengths"], batch["response_lengths"],
        kind=config.dense_divergence, temperature=float(getattr(args, "rollout_temperature", 1.0) or 1.0),
        vocab_start=rank * logits.size(-1), vocab_size=tp * logits.size(-1), group=group,
        chunk_rows=int(getattr(args, "log_probs_chunk_size", -1) or -1),
    )
    dense = sum_of_sample_mean(terms["divergence"])
    loss = loss + config.dense_coef * dense
    metrics = dict(metrics)
    metrics["loss"] = loss.clone().detach()
    metrics["dense_kl"] = dense.clone().detach()
    for key in ("teacher_tail", "student_tail", "valid"):
        metrics[f"dense_{key}"] = sum_of_sample_mean(terms[key]).clone().detach()
    return loss, metrics
