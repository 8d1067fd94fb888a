"""Open chat prompts for ``slime-xvocab demo --real``: short questions a small chat model can answer in a sentence.

There is no reference answer: the teacher's log-prob of the student's answer is the signal and the metric. The
system message asks for brevity so that most answers end their turn within the response budget, which makes
the end-of-turn mapping (SmolLM2 ``<|im_end|>`` -> Gemma-3 ``<end_of_turn>``) part of every step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SYSTEM = "You are a helpful assistant. Answer in one or two short sentences."

QUESTIONS = (
    "What is the capital of France?",
    "Why is the sky blue?",
    "How many legs does a spider have?",
    "What does a thermometer measure?",
    "Name three primary colors.",
    "What is photosynthesis?",
    "Why do we have seasons on Earth?",
    "What is the boiling point of water at sea level?",
    "Who wrote Romeo and Juliet?",
    "What is the largest planet in our solar system?",
    "How do bees make honey?",
    "What is the difference between weather and climate?",
    "Why do cats purr?",
    "What is a prime number?",
    "How does a refrigerator keep food cold?",
    "What language is spoken in Brazil?",
    "What is the main ingredient of guacamole?",
    "Why should you wash your hands before eating?",
    "What is gravity?",
    "How many continents are there?",
    "What is the function of the heart?",
    "What does a librarian do?",
    "Why do leaves change color in autumn?",
    "What is the tallest animal on land?",
    "How do you make a cup of tea?",
    "What is the freezing point of water in Fahrenheit?",
    "What causes rain?",
    "What is an adjective?",
    "Why is exercise good for you?",
    "What is the chemical symbol for gold?",
    "How long does it take the Earth to orbit the Sun?",
    "What is a volcano?",
    "Give one tip for getting better sleep.",
    "What is the opposite of 'ancient'?",
    "What do pandas eat?",
    "What is the purpose of a seatbelt?",
    "What does a compass show?",
    "Why do people recycle plastic?",
    "What is the speed of light, roughly?",
    "What is a haiku?",
    "How does a bicycle stay upright when moving?",
    "What is the largest ocean on Earth?",
    "What is a synonym for 'happy'?",
    "Why do we need sleep?",
    "What is the square root of 81?",
    "What is the Great Wall of China?",
    "What does DNA stand for?",
    "How do plants drink water?",
    "What is a rainbow?",
    "Suggest a name for a friendly robot.",
    "What is the moon made of?",
    "Why is the ocean salty?",
    "What is a computer program?",
    "What are clouds made of?",
    "Why do birds migrate?",
    "What is the main job of the lungs?",
)


@dataclass(frozen=True)
class ChatPrompt:
    """One open question in slime's data shape: ``messages()`` for the data source, ``answer`` as the label."""

    question: str
    system: str = SYSTEM
    answer: str = ""  # no reference answer: the teacher judges

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.system}, {"role": "user", "content": self.question}]


def split_prompts(n_eval: int, seed: int) -> tuple[list[ChatPrompt], list[ChatPrompt]]:
    """Shuffle :data:`QUESTIONS` with ``seed`` and hold out ``n_eval`` of them; returns ``(train, eval)``."""
    prompts = [ChatPrompt(q) for q in QUESTIONS]
    random.Random(seed).shuffle(prompts)
    return prompts[n_eval:], prompts[:n_eval]
