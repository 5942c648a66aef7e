"""Pseudonyms: the only form in which a subject or file identity leaves ingestion.

A keyed hash (HMAC-SHA256) keeps one subject's images together across runs while
making the original ID unrecoverable without the key, which lives in settings,
never in the repository.
"""

from __future__ import annotations

import hashlib
import hmac


def pseudonym(value: str, key: bytes, prefix: str = "") -> str:
    digest = hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()[:16]
    return f"{prefix}{digest}"
