"""Every error slime-xvocab raises.

    XVocabError
    ├── ConfigError            bad or missing configuration (raised once, listing every problem)
    ├── SampleError            one sample's input is unusable (names the sample and the field)
    │   └── ByteMismatchError  student and teacher token bytes disagree (says where and why)
    ├── TokenizerError         a tokenizer whose token bytes cannot be derived or verified
    └── TeacherError           the teacher server failed
        ├── TeacherUnavailable     connection refused/reset, 5xx after every retry
        ├── TeacherTimeout         no answer within the timeout after every retry
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
    """The teacher server could not score a request."""


class TeacherUnavailable(TeacherError):
    """Connection errors or 5xx answers outlasted every retry."""


class TeacherTimeout(TeacherError):
    """The teacher did not answer within the timeout, on every attempt."""


class TeacherRequestRejected(TeacherError):
    """The teacher answered 4xx; the request itself is wrong and is not retried."""


class TeacherBadResponse(TeacherError):
    """The teacher answered, but the answer failed validation."""
