"""Secrets never leave memory: every text agelab writes to a store, a log line or an error
message goes through :func:`scrub` (or :func:`mask_uri` for URIs shown to the user)."""

from __future__ import annotations

import os
import re
from typing import Any

_URI_TOKEN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")
# user:password@ up to the *last* "@" of the URI: a password may hold "/", ":" or "@"
# unencoded (SQLAlchemy reads "postgresql://u:pa/ss@host/db" as password "pa/ss").
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*):.*@", re.S)
# In http(s) URIs a "/" in the password must be encoded, so the user part ends there.
_USERINFO_HTTP = re.compile(r"^(https?://[^:/@\s]*):[^/?#\s]*@", re.I)


def _mask_token(uri: str) -> str:
    pattern = _USERINFO_HTTP if uri[:5].lower() in ("http:", "https") else _USERINFO
    return pattern.sub(r"\1:***@", uri, count=1)


def mask_uri(uri: str) -> str:
    """Hide the password of ``scheme://user:password@host`` URIs for logs and tags (also
    URIs inside a longer text, and ``?password=`` query parameters)."""
    uri = _URI_TOKEN.sub(lambda m: _mask_token(m.group(0)), uri)
    return re.sub(r"([?&]password=)[^&\s]*", r"\1***", uri, flags=re.I)


def mask_home(text: str) -> str:
    """``/home/ana/data`` → ``~/data``: no absolute home paths in params and tags."""
    home = os.path.expanduser("~").rstrip("/")
    if len(home) < 2:  # no home, or "/": nothing sensible to replace
        return text
    # Not inside another path ("/x/home/ana"), but after "sqlite:///" or "file://".
    before = r"(?<![\w.~-])(?<![^/]/)"
    return re.sub(before + re.escape(home) + r"(?=/|$|[^\w.-])", "~", text)


def scrub(value: Any) -> str:
    """What agelab records as a param or tag value: passwords masked, home paths as ~."""
    return mask_home(mask_uri(str(value)))
