"""Secrets never leave memory: every text agelab writes to a store, an artifact, a report, a
log line or an error message goes through :func:`mask_uri` (or :func:`scrub`, which also
shortens home paths, for MLflow params and tags; :func:`mask_tree` for nested data).

Two layers, because no pattern can find the end of every password in free text:

1. **Known secrets.** The passwords and tokens actually configured — in ``tracking.uri``,
   ``tracking.storage`` and ``tracking.artifact_location`` (registered when a config is
   validated), in ``$MLFLOW_TRACKING_URI``, ``$AGELAB_OPTUNA_STORAGE`` and the other
   variables of :data:`SECRET_ENV_URIS` / :data:`SECRET_ENV_VALUES` (read at each call) —
   are replaced wherever they appear, as written and in their %-decoded, %-encoded and
   quoted forms. This catches a password with spaces, ``@``, ``/`` or unicode in any message.
2. **Patterns.** The password of any ``scheme://user:password@host`` in the text (up to the
   last ``@`` of the URI; across spaces when the URI has no ``@`` before them), the whole
   user part of ``http(s)://token@host``, and the values of credential-like parameters
   (``password=``, ``sslpassword=``, ``token=``, ``api_key=``, ``secret=`` …, in query
   strings and ``key=value`` connection strings).

Known secrets shorter than :data:`MIN_KNOWN_SECRET` characters are masked by the patterns
only: replacing every ``ab`` of a message would make it unreadable.
"""

from __future__ import annotations

import functools
import json
import os
import re
import urllib.parse
from collections.abc import Iterable
from typing import Any

MASK = "***"

#: Known secrets shorter than this are only masked inside URIs (by the patterns).
MIN_KNOWN_SECRET = 4

#: Environment variables holding URIs whose passwords and tokens are secrets.
SECRET_ENV_URIS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "AGELAB_OPTUNA_STORAGE")
#: Environment variables whose whole value is a secret.
SECRET_ENV_VALUES = (
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "PGPASSWORD",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)

#: Schemes whose user part ends at the first "/", "?" or "#" (RFC 3986), and where a user
#: name without a password is a credential (``https://ghp_token@github.com``).
WEB_SCHEMES = frozenset({"http", "https", "ws", "wss", "ftp", "ftps"})

_SCHEME = re.compile(r"(?<![A-Za-z0-9+.-])([A-Za-z][A-Za-z0-9+.-]*)://")
_USER = re.compile(r"[^:/@\s]*:")  # "user:" at the start of a URI's authority
_PORT = re.compile(r"\d*(?:[/?#]|$)")  # after "host:": a port, so no password here
_HOST_PORT_PATH = re.compile(r"[^:/@]*:\d*(?:/|$)")
_CREDENTIAL_KEY = (
    r"[\w.-]*?(?:password|passwd|pwd|secret|token|api[_-]?key|apikey|access[_-]?key|"
    r"credentials?|signature|auth)"
)
_CREDENTIAL_PARAM = re.compile(
    rf"(?i)(?<![\w.-])({_CREDENTIAL_KEY}=)('[^']*'|\"[^\"]*\"|[^&\s#;]*)"
)

_KNOWN: set[str] = set()  # registered secrets, all forms, each at least MIN_KNOWN_SECRET long


# ------------------------------------------------------------------------ known secrets


def _forms(secret: str) -> set[str]:
    """A secret as it may appear in a text: as written, %-decoded, %-encoded (upper and lower
    hex, with and without "+" for spaces, SQLAlchemy's minimal quoting) and quoted (repr,
    JSON)."""
    plain = {secret, urllib.parse.unquote(secret), urllib.parse.unquote_plus(secret)}
    out = set(plain)
    for p in plain:
        for enc in (
            urllib.parse.quote(p, safe=""),
            urllib.parse.quote_plus(p, safe=""),
            urllib.parse.quote(p),
            re.sub(r"[@:/%]", lambda m: f"%{ord(m.group(0)):02X}", p),
        ):
            out |= {enc, re.sub(r"%[0-9A-F]{2}", lambda m: m.group(0).lower(), enc)}
        out |= {repr(p)[1:-1], json.dumps(p)[1:-1], json.dumps(p, ensure_ascii=False)[1:-1]}
    return {s for s in out if len(s) >= MIN_KNOWN_SECRET}


def _authority_candidates(rest: str, web: bool) -> set[str]:
    """Possible passwords (or tokens) of a URI's text after ``scheme://``: each "@" that may
    end the user part gives one reading (a password may hold "@" itself). Only the "@"s of
    the authority (before the first "/", "?" or "#" for web URIs, before the first "?" for
    database URIs) count while there are any, so a "@" in a path or query is not taken for
    the end of a password; without one there, the password holds such a character."""
    m = _USER.match(rest)
    if not m and not web:
        return set()  # "postgresql://user@host": a user name alone is not a secret
    start = m.end() if m else 0
    head = re.split(r"[/?#]" if web else r"\?", rest, maxsplit=1)[0]
    ats = [i for i, ch in enumerate(head) if ch == "@" and i >= start]
    if not ats:
        if _HOST_PORT_PATH.match(head):
            return set()  # "host:5432/db?o=a@b": a port, and an "@" in the query
        ats = [i for i, ch in enumerate(rest) if ch == "@" and i >= start]
    return {rest[start:at] for at in ats if at > start}


def secrets_of(uri: str) -> set[str]:
    """The passwords, tokens and credential parameters of a URI (every plausible reading),
    each in all the forms it may take in a text."""
    found: set[str] = set()
    m = _SCHEME.match(uri.strip())
    if m:
        rest = uri.strip()[m.end() :]
        found |= _authority_candidates(rest, m.group(1).lower() in WEB_SCHEMES)
    for pm in _CREDENTIAL_PARAM.finditer(uri):
        value = pm.group(2).strip("'\"")
        found |= {value, urllib.parse.unquote_plus(value)}
    out: set[str] = set()
    for secret in found:
        if secret and secret != MASK:
            out |= _forms(secret)
    return out


def register_secret(value: str | None) -> None:
    """Mask ``value`` (and its encoded forms) in every text from now on."""
    if value and value != MASK:
        _KNOWN.update(_forms(value))


def register_uri(uri: str | None) -> None:
    """Mask the passwords and tokens of ``uri`` in every text from now on."""
    if uri:
        _KNOWN.update(secrets_of(uri))


def forget_secrets() -> None:
    """Drop the registered secrets (tests; a long-lived process switching configs)."""
    _KNOWN.clear()


@functools.lru_cache(maxsize=8)
def _env_forms(uris: tuple[str, ...], values: tuple[str, ...]) -> frozenset[str]:
    out: set[str] = set()
    for uri in uris:
        out |= secrets_of(uri)
    for value in values:
        out |= _forms(value)
    return frozenset(out)


def known_secrets() -> list[str]:
    """Every secret form to replace, longest first (so a longer form is not cut by a shorter
    one it contains)."""
    env = os.environ
    from_env = _env_forms(
        tuple(env.get(k, "") for k in SECRET_ENV_URIS if env.get(k)),
        tuple(env.get(k, "") for k in SECRET_ENV_VALUES if env.get(k)),
    )
    return sorted(_KNOWN | from_env, key=lambda s: (-len(s), s))


def _replace_known(text: str, secrets: Iterable[str]) -> str:
    # Repeat until nothing changes: a replacement may join two halves of a secret ("****"
    # masked inside "********"). Each pass shortens the text, so this ends.
    for _ in range(32):
        before = text
        for secret in secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        if text == before:
            break
    return text


# ----------------------------------------------------------------------------- patterns


def _userinfo_span(text: str, start: int, web: bool) -> tuple[int, int] | None:
    """The secret part of a URI whose authority starts at ``start``: (begin, end) offsets,
    or None when the URI holds no credentials."""
    line_end = text.find("\n", start)
    line_end = len(text) if line_end < 0 else line_end
    space = re.search(r"\s", text[start:line_end])
    token = text[start : start + space.start()] if space else text[start:line_end]
    user = _USER.match(token)
    if web:
        authority = re.split(r"[/?#]", token, maxsplit=1)[0]
        at = authority.rfind("@")
    else:
        head = token.split("?", 1)[0]
        at = head.rfind("@")
        if at < 0 and not _HOST_PORT_PATH.match(head):
            at = token.rfind("@")
    if at < 0:
        if user is None or _PORT.match(token, user.end()):
            return None
        # "user:pa ss@host": the URI has no "@" before a space, so the password holds
        # spaces: it ends at the last "@" on this line before the next URI.
        nxt = _SCHEME.search(text, start, line_end)
        at = text.rfind("@", start, nxt.start() if nxt else line_end) - start
        if at < 0:
            return None
    if user is not None and user.end() <= at + 1:
        return start + user.end(), start + at
    return (start, start + at) if web else None


def _mask_userinfo(text: str) -> str:
    out, pos = [], 0
    for m in _SCHEME.finditer(text):
        if m.start() < pos:
            continue  # inside a part already masked
        span = _userinfo_span(text, m.end(), m.group(1).lower() in WEB_SCHEMES)
        if span is None or span[0] == span[1]:
            continue
        out += [text[pos : span[0]], MASK]
        pos = span[1]
    return "".join(out) + text[pos:]


# ------------------------------------------------------------------------------ the API


def mask_uri(text: Any) -> str:
    """``text`` with every secret masked: the one masking function agelab uses for messages,
    log lines, tags, params, artifacts and reports (see the module docstring)."""
    # Known secrets first: they are exact, so a URI whose password has spaces is masked to
    # just its password, and the patterns then see a well-formed "user:***@host". Once more
    # after the patterns, in case a "***" they wrote completed a secret with its neighbours.
    known = known_secrets()
    text = _mask_userinfo(_replace_known(str(text), known))
    text = _CREDENTIAL_PARAM.sub(lambda m: m.group(1) + MASK, text)
    return _replace_known(text, known)


def mask_tree(obj: Any) -> Any:
    """Nested dicts/lists with every string (keys too) passed through :func:`mask_uri`."""
    if isinstance(obj, str):
        return mask_uri(obj)
    if isinstance(obj, dict):
        return {mask_tree(k) if isinstance(k, str) else k: mask_tree(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [mask_tree(v) for v in obj]
    return obj


def mask_home(text: str) -> str:
    """``/home/ana/data`` → ``~/data``: no absolute home paths in params and tags."""
    home = os.path.expanduser("~").rstrip("/")
    if len(home) < 2:  # no home, or "/": nothing sensible to replace
        return text
    # Not inside another path ("/x/home/ana"), but after "sqlite:///" or "file://".
    before = r"(?<![\w.~-])(?<![^/]/)"
    return re.sub(before + re.escape(home) + r"(?=/|$|[^\w.-])", "~", text)


def scrub(value: Any) -> str:
    """What agelab records as a param or tag value: secrets masked, home paths as ~."""
    return mask_home(mask_uri(value))
