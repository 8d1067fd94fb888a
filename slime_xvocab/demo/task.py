"""The demo's controlled task: chat-formatted addition with a checkable answer.

``What is 47 + 85?`` -> ``132``. Two tokenizer families spell numbers differently (Qwen3 splits every digit,
Llama-3 groups up to three digits), which is exactly what a cross-vocabulary distillation has to bridge.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One addition problem.

    Attributes:
        a: first operand.
        b: second operand.
    """

    a: int
    b: int

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    def messages(self, with_answer: bool = False) -> list[dict[str, str]]:
        """Chat messages for this problem; ``with_answer`` appends the assistant turn (for SFT)."""
        msgs = [{"role": "user", "content": f"What is {self.a} + {self.b}?"}]
        if with_answer:
            msgs.append({"role": "assistant", "content": self.answer})
        return msgs


def all_problems(lo: int, hi: int) -> list[Problem]:
    """Every ordered pair ``(a, b)`` with ``lo <= a, b <= hi``."""
    return [Problem(a, b) for a in range(lo, hi + 1) for b in range(lo, hi + 1)]


def split_problems(
    problems: list[Problem], n_eval: int, seed: int
) -> tuple[list[Problem], list[Problem]]:
    """Shuffle with ``seed`` and hold out ``n_eval`` problems for evaluation.

    Returns:
        ``(train, eval)``; the two lists are disjoint.
    """
    rng = random.Random(seed)
    shuffled = list(problems)
    rng.shuffle(shuffled)
    return shuffled[n_eval:], shuffled[:n_eval]


def is_correct(problem: Problem, response_text: str) -> bool:
    """True when the response (end-of-turn already stripped) is exactly the answer, spaces aside."""
    return response_text.strip() == problem.answer
