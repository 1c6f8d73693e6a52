"""Credentials never land in files or logs: passwords in URLs (``scheme://user:PASSWORD@host``)
and secret query parameters (``?token=...``, signed-URL signatures) are replaced by ``***`` in
everything loraga-ray writes (its JSON files, MLflow params and tags, log lines, error messages).

A saved URI that was redacted cannot be used again as it is; :func:`restore` takes the real one
from ``MLFLOW_TRACKING_URI`` when that matches, so a run or search can be resumed."""

from __future__ import annotations

import os
import re
from typing import Any

MASK = "***"
_USERINFO = re.compile(r"(?P<head>\b[a-zA-Z][\w+.-]*://[^:/@\s]*):(?P<secret>[^@/\s]+)@")
_SECRET_PARAMS = ("token", "access_token", "id_token", "auth", "password", "passwd", "pwd", "secret", "key",
                  "api_key", "apikey", "signature", "sig", "x-amz-signature", "x-amz-credential",
                  "x-amz-security-token", "x-goog-signature", "x-goog-credential", "credential", "sas")
_QUERY = re.compile(r"(?P<head>[?&](?:" + "|".join(re.escape(p) for p in _SECRET_PARAMS) + r")=)[^&\s#\"']+",
                    re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with URL passwords and secret query values replaced by ``***``."""
    if not isinstance(text, str) or ("://" not in text and "=" not in text):
        return text
    return _QUERY.sub(lambda m: m.group("head") + MASK, _USERINFO.sub(lambda m: f"{m.group('head')}:{MASK}@", text))


def redact_obj(obj: Any) -> Any:
    """A copy of a JSON-like object (dicts, lists, tuples, strings) with every string redacted."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_obj(v) for v in obj)
    return obj


def restore(saved: str | None, what: str = "tracking URI") -> str | None:
    """The usable form of a URI read back from our own files: as it is, or, where it was
    redacted, ``MLFLOW_TRACKING_URI`` if that is the same URI with its credentials; otherwise a
    clear error saying how to give it again."""
    if saved is None or MASK not in saved:
        return saved
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and redact(env) == saved:
        return env
    raise ValueError(
        f"the saved {what} {saved} held credentials, which loraga-ray never writes to disk; set "
        "MLFLOW_TRACKING_URI to the full URI (or pass --tracking-uri again) to continue."
    )


class RedactingFilter:
    """A logging filter that redacts each record's message (install on handlers)."""

    def filter(self, record) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        return True
