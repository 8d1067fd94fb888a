"""Compact model vocabularies over real tokenizer ids.

Full vocabularies (128k-152k rows) would make CPU training far too slow, so each demo model only has rows for
the real ids the task can produce, plus one "other" slot. Index ``k < K`` is real id ``real_ids[k]``; index ``K``
is "other". The mapping is saved next to a model as ``xvocab_vocab_map.json`` (``{"real_ids": [...]}``), the
format the reference teacher server reads, so the server can take and report real ids.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

VOCAB_MAP_FILE = "xvocab_vocab_map.json"


class CompactVocab:
    """Bijection between a set of real token ids and model indices ``0..K-1`` (+ ``K`` = other).

    Args:
        real_ids: the real ids to keep, in model-index order (duplicates are not allowed).

    Example:
        >>> v = CompactVocab([151644, 15, 16])
        >>> v.to_model([16, 999]).tolist(), v.to_real([0, 3]).tolist()
        ([2, 3], [151644, -1])
    """

    def __init__(self, real_ids: Iterable[int]):
        self.real_ids = np.asarray(list(real_ids), dtype=np.int64)
        if len(set(self.real_ids.tolist())) != len(self.real_ids):
            raise ValueError("CompactVocab: real_ids contains duplicates")
        self._index = {int(r): k for k, r in enumerate(self.real_ids)}

    @property
    def other(self) -> int:
        """Model index of the "other" slot (= K)."""
        return len(self.real_ids)

    @property
    def size(self) -> int:
        """Model vocabulary size, K + 1."""
        return len(self.real_ids) + 1

    def to_model(self, real: Iterable[int]) -> np.ndarray:
        """Real ids -> model indices; ids outside the vocabulary map to the "other" slot."""
        return np.asarray([self._index.get(int(r), self.other) for r in real], dtype=np.int64)

    def to_real(self, model: Iterable[int]) -> np.ndarray:
        """Model indices -> real ids; the "other" slot maps to -1."""
        m = np.asarray(list(model), dtype=np.int64)
        ext = np.concatenate([self.real_ids, np.array([-1], dtype=np.int64)])
        return ext[m]

    def save(self, model_dir: Path) -> None:
        """Write ``xvocab_vocab_map.json`` into ``model_dir``."""
        (Path(model_dir) / VOCAB_MAP_FILE).write_text(json.dumps({"real_ids": self.real_ids.tolist()}))

    @classmethod
    def load(cls, model_dir: Path) -> CompactVocab:
        """Read ``xvocab_vocab_map.json`` from ``model_dir``."""
        return cls(json.loads((Path(model_dir) / VOCAB_MAP_FILE).read_text())["real_ids"])

    @classmethod
    def from_corpus(cls, id_lists: Iterable[Iterable[int]], extra: Iterable[int] = ()) -> CompactVocab:
        """Every id seen in ``id_lists`` plus ``extra``, sorted (so the map is deterministic)."""
        seen: set[int] = set(int(i) for i in extra)
        for ids in id_lists:
            seen.update(int(i) for i in ids)
        return cls(sorted(seen))


class IdentityVocab:
    """A real model's full vocabulary: model index == real id, no "other" slot (the ``--real`` demo).

    It has the parts of :class:`CompactVocab` that :class:`~slime_xvocab.demo.models.ChatLM` uses, so the
    same sampling and scoring code runs on tiny compact models and on real checkpoints.
    """

    def __init__(self, num_rows: int):
        self.num_rows = int(num_rows)

    @property
    def other(self) -> int:
        """One past the last row: slicing logits ``[:other]`` keeps every row."""
        return self.num_rows

    @property
    def size(self) -> int:
        return self.num_rows

    def to_model(self, real: Iterable[int]) -> np.ndarray:
        return np.asarray(list(real), dtype=np.int64)

    def to_real(self, model: Iterable[int]) -> np.ndarray:
        return np.asarray(list(model), dtype=np.int64)
