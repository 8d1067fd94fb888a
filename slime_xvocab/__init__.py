"""slime-xvocab: on-policy distillation in slime when teacher and student use different tokenizers.

The data flow, one module per stage:

    ① messages (kept in sample.metadata by ``data_source``)
    ② ``teacher_view``    re-render them with the teacher's chat template + the student's response bytes
    ③ ``teacher_client``  score the teacher view on an SGLang server (prefill-only log-probs)
    ④ ``alignment``       map teacher log-probs onto student positions (byte-exact chunks), using
                          ``token_bytes`` for the bytes each token id spells
    ⑤ ``hooks``           slime's reward / post-process hooks: write ``sample.teacher_log_probs``
"""

__version__ = "0.1.0"
