"""Every error slime-xvocab raises.

    XVocabError
    ├── ConfigError            bad or missing configuration (raised once, listing every problem)
    ├── SampleError            one sample's input is unusable (names the sample and the field)
    │   └── ByteMismatchError  student and teacher token bytes disagree (says where and why)
    ├── TokenizerError         a tokenizer whose token bytes cannot be derived or verified
    └── TeacherError           the teacher server failed
        ├── TeacherUnavailable     connection refused/reset, 5xx, 408/429 after the retry budget
        ├── TeacherTimeout         no answer within the timeout, after the retry budget
        ├── TeacherRequestRejected 4xx: the server refused the request (not retried)
        └── TeacherBadResponse     an answer that fails validation (wrong length, ids, JSON)

All errors are plain exceptions with a string message, so they pickle across Ray actors.
"""

from __future__ import annotations


class XVocabError(Exception):
    """Base class of every slime-xvocab error."""


class ConfigError(XVocabError, ValueError):
    """Configuration is invalid. The message lists every problem found, one per line."""


class SampleError(XVocabError, ValueError):
    """A sample cannot be processed. The message names the sample and the field, and the fix."""


class ByteMismatchError(SampleError):
    """The student's and the teacher's tokens do not spell the same bytes."""


class NonFiniteCreditError(SampleError):
    """The credit of a sample came out NaN or infinite; the sample falls back instead of reaching training."""


class TokenizerError(XVocabError, ValueError):
    """A tokenizer's per-token bytes could not be derived or failed verification."""


class TeacherError(XVocabError, RuntimeError):
    """The teacher server could not score a request.

    Attributes:
        attempts: HTTP attempts the call made before giving up (0 when nothing was sent).
        latency_s: wall time the call spent, retries and backoff included (seconds).

    Both survive pickling (they live in the instance ``__dict__``), so the counts reach the metrics.
    """

    def __init__(self, message: str = "", *, attempts: int = 0, latency_s: float = 0.0) -> None:
        super().__init__(message)
        self.attempts = attempts
        self.latency_s = latency_s


class TeacherUnavailable(TeacherError):
    """Connection errors, 5xx, 408 or 429 answers outlasted the retry budget."""


class TeacherTimeout(TeacherError):
    """The teacher did not answer within the timeout, on every attempt of the retry budget."""


class TeacherRequestRejected(TeacherError):
    """The teacher answered 4xx; the request itself is wrong and is not retried."""


class TeacherBadResponse(TeacherError):
    """The teacher answered, but the answer failed validation."""
