"""Shared fixtures: real tokenizers from registry packages, loaded once per test run."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from slime_xvocab.assets import TEST_FAMILIES, load_tokenizer  # noqa: E402
from slime_xvocab.token_bytes import token_bytes  # noqa: E402


@pytest.fixture(scope="session")
def tokenizers() -> dict:
    """Every test family's real tokenizer, by family name (fetched and cached on first use)."""
    return {name: load_tokenizer(name) for name in TEST_FAMILIES}


@pytest.fixture(scope="session")
def tables(tokenizers) -> dict:
    """Every test family's :class:`~slime_xvocab.token_bytes.TokenBytes` table."""
    return {name: token_bytes(tok) for name, tok in tokenizers.items()}
