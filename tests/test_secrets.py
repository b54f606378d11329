"""The one masking function (:func:`agelab.secrets.mask_uri`), property-tested.

Passwords are drawn from a wide alphabet (space, unicode, ``%@/:#?&=+;'"\\``, control
characters) and put into URIs of every shape agelab meets (SQLAlchemy database URIs, HTTP(S)
with a password or a user-only token, credential query parameters), raw or %-encoded, inside
longer messages. Configured secrets (registered, or in the environment) must never appear
in the output, as written, %-encoded or %-decoded. Without registration, the patterns alone
must mask every password of a well-formed (%-encoded) URI.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from urllib.parse import quote, quote_plus, unquote

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from agelab import secrets as S
from agelab.config import validate
from agelab.secrets import MASK, forget_secrets, mask_tree, mask_uri, register_uri, scrub


@pytest.fixture(autouse=True)
def _no_secrets_between_tests() -> Iterator[None]:
    forget_secrets()
    yield
    forget_secrets()


passwords = st.text(
    st.characters(exclude_categories=("Cs",)) | st.sampled_from(list(" %@/:#?&=+;'\"\\\t")),
    min_size=S.MIN_KNOWN_SECRET,
    max_size=24,
)
# The words around a URI in a message: no "%" (a random "%41" next to the output would
# decode into a password the generator itself wrote there) and no "@" or ":" (which would
# make the words part of the URI).
words = st.text(st.sampled_from(list("abcdefgh XYZ0123456789.,()'-")), max_size=30)


def shapes(p: str) -> list[str]:
    """Every URI shape with password ``p`` (raw where drivers accept it, else encoded)."""
    q, qp = quote(p, safe=""), quote_plus(p, safe="")
    return [
        f"postgresql+psycopg2://ana:{p}@db.example:5432/optuna",
        f"postgresql://ana:{q}@db.example/optuna",
        f"https://ana:{q}@mlflow.example/path?x=1",
        f"https://{q}@mlflow.example",
        f"postgresql://ana@db.example/optuna?sslmode=require&password={qp}",
        f"postgresql://ana:{q}@db.example/optuna?sslpassword={qp}",
        f"https://mlflow.example/api?token={q}&x=1",
        f"mysql://ana:{p}@db.example/x?api_key={qp}",
    ]


def assert_hidden(p: str, out: str) -> None:
    for form in {p, quote(p, safe=""), quote_plus(p, safe=""), quote(p)}:
        assert form not in out, f"{form!r} in {out!r}"
    assert p not in unquote(out), f"{p!r} in unquote({out!r})"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=passwords, shape=st.integers(0, 7), before=words, after=words)
def test_a_configured_password_never_appears(p: str, shape: int, before: str, after: str):
    uri = shapes(p)[shape]
    text = f"{before} {uri} {after}"
    assume(p not in text.replace(uri, ""))  # the words themselves must not hold it
    forget_secrets()
    register_uri(uri)
    out = mask_uri(text)
    assert_hidden(p, out)
    assert MASK in out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=passwords, shape=st.integers(0, 7), before=words)
def test_a_password_from_the_environment_never_appears(p: str, shape: int, before: str):
    uri = shapes(p)[shape]
    assume(p not in before and "\x00" not in uri)  # no environment variable holds a NUL
    old = os.environ.get("AGELAB_OPTUNA_STORAGE")
    os.environ["AGELAB_OPTUNA_STORAGE"] = uri
    try:
        # Also the password alone, decoded, as a driver's error message might say it.
        out = mask_uri(f"{before} {uri}: authentication failed for {p!r} ({p})")
    finally:
        if old is None:
            del os.environ["AGELAB_OPTUNA_STORAGE"]
        else:
            os.environ["AGELAB_OPTUNA_STORAGE"] = old
    assert_hidden(p, out)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(p=passwords, shape=st.sampled_from([1, 2, 3, 4, 6]), before=words, after=words)
def test_patterns_alone_mask_every_well_formed_uri(p: str, shape: int, before: str, after: str):
    """Nothing registered, nothing in the environment: a %-encoded password (a valid URI)
    is found by the patterns wherever the URI stands in a message."""
    uri = shapes(p)[shape]
    text = f"{before} {uri} {after}"
    assume(p not in text.replace(uri, "") and quote(p, safe="") not in text.replace(uri, ""))
    saved = {
        k: os.environ.pop(k) for k in (*S.SECRET_ENV_URIS, *S.SECRET_ENV_VALUES) if k in os.environ
    }
    try:
        out = mask_uri(text)
    finally:
        os.environ.update(saved)
    assert quote(p, safe="") not in out and quote_plus(p, safe="") not in out
    assert p not in unquote(out)


@settings(max_examples=100, deadline=None)
@given(p=passwords)
def test_a_validated_config_registers_its_passwords(p: str):
    """Validating a config is enough: its storage password is masked in any later text,
    and in the config dump that becomes the config.json artifact."""
    uri = f"postgresql://ana:{quote(p, safe='')}@db.example/optuna"
    cfg = validate({"name": "x", "tracking": {"storage": uri}})
    dumped = mask_tree(cfg.model_dump(mode="json"))
    assert dumped["tracking"]["storage"] == f"postgresql://ana:{MASK}@db.example/optuna"
    out = scrub(f"the driver said: password {p} rejected")
    assert_hidden(p, out)


# --------------------------------------------------------------------------- examples


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("postgresql://u:pa ss@h/db is down", "postgresql://u:***@h/db is down"),
        ("https://ghp_abc123@github.com/x.git", "https://***@github.com/x.git"),
        ("https://h/x?token=abc&api_key=zz#f", "https://h/x?token=***&api_key=***#f"),
        ("host=h password=sec dbname=x", "host=h password=*** dbname=x"),
        ("postgresql://host:5432/db?o=a@b", "postgresql://host:5432/db?o=a@b"),
        ("http://host:5000 is down, mail a@b", "http://host:5000 is down, mail a@b"),
        ("https://u:pa/ss@h/x", "https://u:***@h/x"),
        (
            "sqlite:///file:/tmp/x.db?mode=rwc&password=s3cret&uri=true",
            "sqlite:///file:/tmp/x.db?mode=rwc&password=***&uri=true",
        ),
        ("journal:/home/a/optuna/journal.log", "journal:/home/a/optuna/journal.log"),
        ("max_tokens=5 author=ana", "max_tokens=5 author=ana"),
    ],
)
def test_patterns(text: str, masked: str) -> None:
    assert mask_uri(text) == masked


def test_secret_variables_are_masked_anywhere(monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2 ä")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-123456")
    out = mask_uri("login hunter2 ä / hunter2%20%C3%A4 with tok-123456")
    assert out == f"login {MASK} / {MASK} with {MASK}"


def test_short_secrets_are_masked_in_uris_only() -> None:
    """Replacing every "ab" of a message would make it unreadable: a secret shorter than
    MIN_KNOWN_SECRET is masked where the patterns find it."""
    register_uri("postgresql://u:ab@h/db")
    assert mask_uri("table postgresql://u:ab@h/db") == f"table postgresql://u:{MASK}@h/db"


def test_a_password_that_joins_around_the_mask_is_still_masked() -> None:
    register_uri("postgresql://u:****@h/db")
    assert "****" not in mask_uri("a ******** b postgresql://u:****@h/db")


def test_mask_tree_masks_nested_strings() -> None:
    register_uri("postgresql://u:nested-pw@h/db")
    tree = {"a": ["x nested-pw", {"nested-pw": 3}], "b": 1.5, "c": None}
    assert mask_tree(tree) == {"a": [f"x {MASK}", {MASK: 3}], "b": 1.5, "c": None}
