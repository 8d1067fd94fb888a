"""Small chat LMs on real tokenizers with compact vocabularies: build, SFT, sample, score.

A :class:`ChatLM` bundles a real tokenizer (with its real chat template), a :class:`CompactVocab` and a
transformers causal LM whose rows are the compact vocabulary (or, for the ``--real`` demo's checkpoints, an
:class:`IdentityVocab` over the full vocabulary). Everything outside this module speaks **real** token ids; the
mapping to model indices happens here only.

Layout of a batch: prompts are left-padded, responses right-padded, so every prompt ends at the same column
and the response log-probs are a rectangular ``[B, R]`` block (positions past ``response_length`` are masked).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from slime_xvocab.demo.vocab import CompactVocab, IdentityVocab


@dataclass
class ChatLM:
    """A causal LM over a compact vocabulary of a real tokenizer.

    Attributes:
        tokenizer: the real Hugging Face tokenizer (its chat template renders prompts).
        vocab: real id <-> model index map (``IdentityVocab`` for a real checkpoint's full vocabulary).
        model: the transformers causal LM (``vocab.size`` rows).
        eot_id: real id of the end-of-turn token (generation stops there).
        template_kwargs: extra ``apply_chat_template`` arguments (e.g. ``enable_thinking=False`` for Qwen3).
    """

    tokenizer: object
    vocab: CompactVocab | IdentityVocab
    model: torch.nn.Module
    eot_id: int
    template_kwargs: dict

    # ----------------------------------------------------------------------------------------- text
    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Real ids of the rendered chat prompt, generation prompt included."""
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **self.template_kwargs
        )
        return self.tokenizer.encode(text, add_special_tokens=False)

    def answer_ids(self, answer: str) -> list[int]:
        """Real ids of an assistant answer followed by end-of-turn (what SFT trains)."""
        return self.tokenizer.encode(answer, add_special_tokens=False) + [self.eot_id]

    def decode_response(self, ids: Sequence[int]) -> str:
        """Response text without a trailing end-of-turn."""
        ids = list(ids)
        if ids and ids[-1] == self.eot_id:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    # ---------------------------------------------------------------------------------------- batch
    def _batch(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]):
        """Model-index tensors for prompt (left-padded) + response (right-padded).

        Returns:
            ``(input_ids [B,T], attention_mask [B,T], position_ids [B,T], P, resp_mask [B,R])`` where the
            response occupies columns ``P..P+R-1``.
        """
        B = len(prompts)
        P = max(len(p) for p in prompts)
        R = max((len(r) for r in responses), default=0)
        ids = np.zeros((B, P + R), dtype=np.int64)  # padding: masked out, any valid row will do
        att = np.zeros((B, P + R), dtype=np.int64)
        rmask = np.zeros((B, R), dtype=np.float32)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids[i, P - len(p) : P] = self.vocab.to_model(p)
            att[i, P - len(p) : P] = 1
            if len(r):
                ids[i, P : P + len(r)] = self.vocab.to_model(r)
                att[i, P : P + len(r)] = 1
                rmask[i, : len(r)] = 1
        att_t = torch.from_numpy(att)
        pos = (att_t.cumsum(-1) - 1).clamp(min=0)
        return torch.from_numpy(ids), att_t, pos, P, torch.from_numpy(rmask)

    def response_logprobs(
        self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs of the response tokens (grad flows when enabled).

        The "other" slot is excluded from the softmax, as in :meth:`sample`, so sampling and training use
        the same distribution.

        Returns:
            ``(logp [B, R], mask [B, R])``; ``logp`` is 0 where ``mask`` is 0.
        """
        ids, att, pos, P, rmask = self._batch(prompts, responses)
        R = rmask.shape[1]
        if R == 0:
            return torch.zeros(len(prompts), 0), rmask
        # Only the response positions go through the LM head: it is a large share of a tiny model's FLOPs.
        hidden = self.model.get_decoder()(input_ids=ids, attention_mask=att, position_ids=pos).last_hidden_state
        logits = self.model.get_output_embeddings()(hidden[:, P - 1 : P + R - 1])[..., : self.vocab.other].float()
        tgt = ids[:, P : P + R].clamp(max=self.vocab.other - 1)
        logp = logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)
        return logp * rmask, rmask

    @torch.no_grad()
    def sample(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
    ) -> tuple[list[list[int]], list[list[float]], list[bool]]:
        """Sample responses (KV cache), stopping at end-of-turn.

        Args:
            prompts: real prompt ids per sample.
            max_new_tokens: response budget; a response that reaches it without end-of-turn is truncated.
            temperature: 0 means greedy; log-probs are those of the sampling distribution (at temperature 1
                they are the policy's own, as slime's OPD requires).
            generator: torch RNG for reproducible sampling.

        Returns:
            ``(response_ids, rollout_log_probs, finished)``: real ids (end-of-turn included when emitted), the
            log-prob of each sampled token, and whether end-of-turn was emitted.
        """
        self.model.eval()
        B = len(prompts)
        ids, att, pos, P, _ = self._batch(prompts, [[] for _ in prompts])
        eot = int(self.vocab.to_model([self.eot_id])[0])
        out = self.model(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=True, logits_to_keep=1)
        past, last_logits = out.past_key_values, out.logits[:, -1]
        next_pos = pos[:, -1] + 1
        done = torch.zeros(B, dtype=torch.bool)
        toks: list[list[int]] = [[] for _ in range(B)]
        lps: list[list[float]] = [[] for _ in range(B)]
        for _ in range(max_new_tokens):
            logits = last_logits[:, : self.vocab.other].float()
            if temperature > 0:
                logp = torch.log_softmax(logits / temperature, -1)
                nxt = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
            else:
                logp = torch.log_softmax(logits, -1)
                nxt = logits.argmax(-1)
            chosen = logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
            for i in range(B):
                if not done[i]:
                    toks[i].append(int(nxt[i]))
                    lps[i].append(float(chosen[i]))
            done |= nxt == eot
            if bool(done.all()):
                break
            att = torch.cat([att, torch.ones(B, 1, dtype=att.dtype)], dim=1)
            out = self.model(
                input_ids=nxt.unsqueeze(-1), attention_mask=att, position_ids=next_pos.unsqueeze(-1),
                past_key_values=past, use_cache=True,
            )
            past, last_logits = out.past_key_values, out.logits[:, -1]
            next_pos = next_pos + 1
        real = [self.vocab.to_real(t).tolist() for t in toks]
        finished = [bool(t) and t[-1] == eot for t in toks]
        return real, lps, finished

    # ------------------------------------------------------------------------------------------ I/O
    def save(self, out_dir: Path) -> None:
        """``save_pretrained`` model + tokenizer + ``xvocab_vocab_map.json`` (the teacher-server format)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(out_dir))
        self.tokenizer.save_pretrained(str(out_dir))
        self.vocab.save(out_dir)
        (out_dir / "xvocab_demo.json").write_text(
            json.dumps({"eot_id": self.eot_id, "template_kwargs": self.template_kwargs})
        )

    @classmethod
    def load(cls, model_dir: Path, tokenizer=None) -> ChatLM:
        """Inverse of :meth:`save`."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = Path(model_dir)
        meta = json.loads((model_dir / "xvocab_demo.json").read_text())
        tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(str(model_dir))
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        return cls(tok, CompactVocab.load(model_dir), model, meta["eot_id"], meta["template_kwargs"])


# ----------------------------------------------------------------------------------------- building
@dataclass(frozen=True)
class ModelSize:
    """Tiny transformer sizes (all CPU friendly)."""

    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int = 512


def build_model(arch: str, vocab_size: int, size: ModelSize, seed: int) -> torch.nn.Module:
    """A freshly initialised ``LlamaForCausalLM`` or ``Qwen3ForCausalLM`` with tiny sizes.

    Args:
        arch: ``"llama"`` or ``"qwen3"``.
        vocab_size: compact vocabulary size (K + 1).
        size: layer sizes.
        seed: init seed.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads, num_key_value_heads=size.heads,
        max_position_embeddings=256, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
        pad_token_id=None,
    )
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common)).float()
    elif arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(head_dim=size.hidden // size.heads, **common)).float()
    else:
        raise ValueError(f"build_model: unknown arch {arch!r}; use 'llama' or 'qwen3'")
    deterministic_init(model, seed)
    return model


def deterministic_init(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Overwrite every parameter from one seeded generator, in sorted-name order: normal(0, ``std``) for
    matrices, ones for norm weights, zeros for other vectors.

    transformers' own initialisation changes between minor versions (5.23 and 5.24 gave the demo's student
    different starting points), so the demo does not use it: the start depends only on ``seed`` and on the
    parameter names and shapes.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.zero_()


def settings_hash(settings: dict) -> str:
    """Short stable hash of a JSON-able settings dict (cache key)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def sft(
    lm: ChatLM,
    examples: Sequence[tuple[list[int], list[int]]],
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
    weight_decay: float = 0.01,
) -> list[float]:
    """Supervised fine-tuning on ``(prompt_ids, answer_ids)`` pairs: prompt masked, answer + EOT trained.

    Uses AdamW with linear warm-up (5 %) and cosine decay.

    Returns:
        The loss per step (mean NLL per answer token).
    """
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(lm.model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    lm.model.train()
    losses = []
    for step in range(steps):
        idx = rng.integers(0, len(examples), size=batch_size)
        logp, mask = lm.response_logprobs([examples[i][0] for i in idx], [examples[i][1] for i in idx])
        loss = -(logp * mask).sum() / mask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, losses[-1])
    lm.model.eval()
    return losses


def greedy_accuracy(lm: ChatLM, prompts: Sequence[list[int]], answers: Sequence[str], max_new: int) -> float:
    """Share of prompts whose greedy response equals the answer."""
    ok = 0
    for s in range(0, len(prompts), 256):
        resp, _, _ = lm.sample(prompts[s : s + 256], max_new, temperature=0.0)
        ok += sum(lm.decode_response(r).strip() == a for r, a in zip(resp, answers[s : s + 256]))
    return ok / max(1, len(prompts))



def numeracy_init(lm: ChatLM, scale: float = 1.0, head_scale: float = 0.1) -> int:
    """Give number tokens a numeric prior: input and output embedding rows = Fourier features of the value.

    A stand-in for pre-training: a teacher that tokenizes ``"347"`` as one token must learn addition over
    atomic tokens, which a tiny random model learns slowly. With ``cos/sin(2*pi*n/T)`` features (periods 2..2000)
    in the first dimensions of every number token's rows, the sum is a rotation of the operands' features and
    SFT reaches high accuracy in a few hundred steps.

    Returns:
        The number of rows initialised.
    """
    emb = lm.model.get_input_embeddings().weight
    head = lm.model.get_output_embeddings().weight
    periods = torch.tensor([2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0])
    n_feat = 2 * len(periods)
    if emb.shape[1] < 2 * n_feat:
        return 0
    count = 0
    with torch.no_grad():
        for k, real in enumerate(lm.vocab.real_ids.tolist()):
            piece = lm.tokenizer.decode([real])
            if not piece.isdigit():
                continue
            ang = 2 * math.pi * int(piece) / periods
            feat = torch.cat([ang.cos(), ang.sin()]) * scale
            emb[k, :n_feat] = feat
            head[k, :n_feat] = feat * head_scale
            count += 1
    return count
