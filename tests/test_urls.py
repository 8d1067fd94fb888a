"""Teacher URL checks and credential redaction (pure functions)."""

from __future__ import annotations

import pytest

from slime_xvocab.urls import check_url, has_credentials, is_loopback, redact_text, redact_url


@pytest.mark.parametrize(
    "url, problem",
    [
        ("http://127.0.0.1:30000", None),
        ("https://teacher.internal/prefix/generate", None),
        ("http://[::1]:30000", None),
        ("http://127.0.0.1:99999", "port 99999 is out of range (1-65535)"),
        ("http://127.0.0.1:0", "port 0 is out of range"),
        ("http://h:port", "port 'port' is not a number"),
        ("ftp://h:1", "must start with http:// or https://"),
        ("http://:30000", "has no host"),
        ("http://bob:hunter22@h:70000", "'http://***@h:70000': port 70000 is out of range"),
    ],
)
def test_check_url(url, problem):
    got = check_url(url)
    assert (got is None) if problem is None else (problem in got), got
    assert got is None or "hunter22" not in got


def test_redaction():
    assert redact_url("http://bob:hunter22@h:1/generate") == "http://***@h:1/generate"
    assert redact_url("https://token@h") == "https://***@h"
    assert redact_url("http://h:1") == "http://h:1"
    text = "POST http://bob:hunter22@h:1/generate failed (key sk-abcdef)"
    assert redact_text(text, ("sk-abcdef", None, "")) == "POST http://***@h:1/generate failed (key ***)"
    assert has_credentials("http://bob@h") and not has_credentials("http://h:1")
    assert is_loopback("http://localhost:1") and is_loopback("http://127.0.0.5:1") and is_loopback("http://[::1]:1")
    assert not is_loopback("http://10.0.0.7:1") and not is_loopback("http://teacher:1")
