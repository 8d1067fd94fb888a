"""slime-xvocab: on-policy distillation in slime when teacher and student use different tokenizers.

The data flow, one module per stage:

    ① messages (kept in sample.metadata by ``data_source``)
    ② ``teacher_view``    re-render them with the teacher's chat template + the student's response bytes
    ③ ``teacher_client``  score the teacher view on an SGLang server (prefill-only log-probs)
    ④ ``alignment``       which bytes correspond: byte-exact chunks of both tokenizations, using
                          ``token_bytes`` for the bytes each token id spells
    ⑤ ``credit``          the teacher's value of each student token (its probability of that student token)
    ⑥ ``hooks``           slime's reward / post-process hooks: write ``sample.teacher_log_probs``

The names below are the public API; they import lazily, so ``import slime_xvocab`` stays cheap and needs
none of slime, ray, sglang or megatron.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "TokenBytes": "token_bytes",
    "token_bytes": "token_bytes",
    "Alignment": "alignment",
    "AlignmentStats": "alignment",
    "BatchAlignment": "alignment",
    "Unaligned": "alignment",
    "align_batch": "alignment",
    "align_response": "alignment",
    "align_spans": "alignment",
    "align_tokens": "alignment",
    "assign_credit": "credit",
    "CreditResult": "credit",
    "StudentExtensions": "credit",
    "student_extensions": "credit",
    "student_token_credit": "credit",
    "encode_bytes": "alignment",
    "TeacherView": "teacher_view",
    "TeacherViewBuilder": "teacher_view",
    "messages_from_metadata": "teacher_view",
    "TeacherClient": "teacher_client",
    "SyncTeacherClient": "teacher_client",
    "TeacherScores": "teacher_client",
    "XVocabConfig": "config",
    "TeacherConfig": "config",
    "mix_log_probs": "routing",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'slime_xvocab' has no attribute {name!r}")
