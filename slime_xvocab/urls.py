"""Teacher URLs: validation and redaction (pure functions, no network).

A teacher URL may carry credentials (``http://user:pass@host:30000``); they must never reach a log line, an
error message, a metric or ``check`` output. :func:`redact_url` is what every such place prints, and
:func:`check_url` is what the configuration and :class:`~slime_xvocab.teacher_client.TeacherClient` run
before a URL is used, so a bad one fails at start-up with the key named instead of at the first request.

Example:
    >>> redact_url("http://alice:s3cret@10.0.0.7:30000/generate")
    'http://***@10.0.0.7:30000/generate'
    >>> check_url("http://h:99999")
    "'http://h:99999': port 99999 is out of range (1-65535)"
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse

__all__ = ["redact_url", "redact_text", "check_url", "has_credentials", "is_loopback"]

_USERINFO = re.compile(r"([a-z][a-z0-9+.-]*://)[^/\s@'\"]*@", re.IGNORECASE)


def redact_url(url: str) -> str:
    """``url`` with any ``user:password@`` replaced by ``***@`` (everything else unchanged)."""
    return _USERINFO.sub(r"\1***@", str(url))


def redact_text(text: str, secrets: tuple[str | None, ...] = ()) -> str:
    """``text`` with URL userinfo redacted and every non-empty string of ``secrets`` replaced by ``***``."""
    out = redact_url(text)
    for secret in secrets:
        if secret and len(secret) >= 4:  # never blank out single characters all over a message
            out = out.replace(secret, "***")
    return out


def has_credentials(url: str) -> bool:
    """Whether ``url`` carries ``user[:password]@``."""
    parts = urllib.parse.urlsplit(url.strip())
    return parts.username is not None or parts.password is not None


def is_loopback(url: str) -> bool:
    """Whether ``url``'s host is this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    host = urllib.parse.urlsplit(url.strip()).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_url(url: str) -> str | None:
    """What is wrong with a teacher URL, or None when it is usable.

    Checks the scheme (``http``/``https``), that there is a host, and that an explicit port is 1-65535.
    The message never repeats credentials.
    """
    if not isinstance(url, str):
        return f"must be a string, got {type(url).__name__}"
    u = url.strip()
    if not u.lower().startswith(("http://", "https://")):
        return f"{redact_url(u)!r} must start with http:// or https:// (e.g. http://127.0.0.1:30000)"
    parts = urllib.parse.urlsplit(u)
    if not parts.hostname:
        return f"{redact_url(u)!r} has no host (e.g. http://127.0.0.1:30000)"
    port_text = parts.netloc.rpartition("@")[2]
    if port_text.startswith("["):  # IPv6 literal: the port, if any, follows the bracket
        port_text = port_text.partition("]")[2]
    port_text = port_text.rpartition(":")[2] if ":" in port_text else ""
    if port_text:
        if not port_text.isdigit():
            return f"{redact_url(u)!r}: port {port_text!r} is not a number"
        if not 1 <= int(port_text) <= 65535:
            return f"{redact_url(u)!r}: port {int(port_text)} is out of range (1-65535)"
    return None
