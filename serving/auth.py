"""API keys with scopes, and a request ID on every exchange.

A key is shown once, when created (``tumorscope keys create``); the store keeps its SHA-256 only, so a copy
of the store lets nobody call the endpoint. Keys are long random tokens, which is why a plain hash (not a
slow password hash) is the right tool. The store is re-read when it changes: a revoked key stops working
at once, without a restart.

Authentication is on when the store holds a key, or when ``TUMORSCOPE_AUTH=required`` (then, with no key,
every guarded route answers 401). No key → 401; a key without the route's scope → 403.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

SCOPES = ("predict", "explain", "feedback", "admin")
ROUTE_SCOPES = {"/predict": "predict", "/predict_batch": "predict", "/explain": "explain", "/feedback": "feedback", "/reload": "admin"}
KEY_PATTERN = re.compile(r"ts_([0-9a-f]{8})_([A-Za-z0-9_-]{20,64})")
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{8,64}")

CLIENT_HEADER = "x-tumorscope-client"  # set by the guard only (a client's own is dropped): the calling key's id


@dataclass(frozen=True)
class StoredKey:
    key_id: str
    name: str
    sha256: str
    scopes: tuple[str, ...]
    created: str


class KeyStore:
    """The hashed keys in one JSON file (mode 600)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._cache: tuple[float, dict[str, StoredKey]] = (-1.0, {})

    def keys(self) -> dict[str, StoredKey]:
        mtime = self.path.stat().st_mtime if self.path.exists() else 0.0
        if mtime != self._cache[0]:
            rows = json.loads(self.path.read_text()) if self.path.exists() else []
            self._cache = (mtime, {row["key_id"]: StoredKey(**{**row, "scopes": tuple(row["scopes"])}) for row in rows})
        return self._cache[1]

    def create(self, name: str, scopes: list[str]) -> str:
        """A new key; the only time its secret exists outside the caller's hands is this return value."""
        unknown = sorted(set(scopes) - set(SCOPES))
        if unknown or not scopes:
            raise ValueError(f"scopes must be some of {', '.join(SCOPES)} (got {', '.join(unknown) or 'none'})")
        key_id, secret = secrets.token_hex(4), secrets.token_urlsafe(32)
        stored = StoredKey(key_id, name, _digest(secret), tuple(sorted(set(scopes))), datetime.now(UTC).isoformat(timespec="seconds"))
        self._write({**self.keys(), key_id: stored})
        return f"ts_{key_id}_{secret}"

    def revoke(self, key_id: str) -> bool:
        keys = self.keys()
        if key_id not in keys:
            return False
        self._write({k: v for k, v in keys.items() if k != key_id})
        return True

    def check(self, presented: str | None) -> StoredKey | None:
        """The stored key behind a presented token, or None (unknown, malformed or revoked)."""
        match = KEY_PATTERN.fullmatch(presented or "")
        stored = self.keys().get(match.group(1)) if match else None
        if stored is None or not hmac.compare_digest(stored.sha256, _digest(match.group(2))):
            return None
        return stored

    def _write(self, keys: dict[str, StoredKey]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch(mode=0o600, exist_ok=True)
        self.path.chmod(0o600)
        self.path.write_text(json.dumps([{**asdict(k), "scopes": list(k.scopes)} for k in keys.values()], indent=2))


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def presented_key(headers: dict[str, str]) -> str | None:
    if token := headers.get("x-api-key"):
        return token.strip()
    scheme, _, token = headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


class AccessGuard:
    """ASGI middleware: a request ID for every HTTP exchange (kept from ``X-Request-ID`` when well formed),
    and the API-key check for the guarded routes. Both reach the service as request headers (``X-Request-ID``,
    ``X-TumorScope-Client``), so the audit record can name them."""

    def __init__(self, app, store_path: Path, required: bool = False) -> None:
        self.app, self.store, self.required = app, KeyStore(store_path), required

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        given = headers.get("x-request-id", "")
        rid = given if REQUEST_ID_PATTERN.fullmatch(given) else uuid.uuid4().hex
        kept = [(k, v) for k, v in scope["headers"] if k.lower() not in (b"x-request-id", CLIENT_HEADER.encode())]
        inner = {**scope, "headers": [*kept, (b"x-request-id", rid.encode())]}

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())]}
            await send(message)

        needed = ROUTE_SCOPES.get(scope["path"].rstrip("/")) if scope["method"] == "POST" else None
        if needed and (self.required or self.store.keys()):
            stored = self.store.check(presented_key(headers))
            if stored is None:
                return await reply(send_with_id, 401, "a valid API key is required (header 'Authorization: Bearer <key>' or 'X-API-Key')")
            if needed not in stored.scopes:
                return await reply(send_with_id, 403, f"this API key lacks the '{needed}' scope")
            inner["headers"].append((CLIENT_HEADER.encode(), stored.key_id.encode()))
        await self.app(inner, receive, send_with_id)


async def reply(send, status: int, message: str) -> None:
    payload = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="tumorscope"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
