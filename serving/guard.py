"""An ASGI guard in front of the upload routes, for the requests BentoML itself mishandles.

BentoML 1.4 answers a multipart request whose file sits under another field name
with a 500 (it tries to JSON-decode the file). This guard answers such requests,
and uploads over the size limit, with a clear 4xx before they reach the service.
"""

from __future__ import annotations

import json
import re

Scope = dict
Message = dict


def _field_pattern(field: str) -> re.Pattern[bytes]:
    return re.compile(rb'content-disposition:[^\r\n]*\bname="' + re.escape(field.encode()) + rb'"', re.IGNORECASE)


class UploadGuard:
    def __init__(self, app, routes: dict[str, str], max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes
        self.fields = {path: (field, _field_pattern(field)) for path, field in routes.items()}

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.fields:
            return await self.app(scope, receive, send)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        if int(headers.get("content-length") or 0) > self.max_bytes:
            return await _reply(send, 413, f"upload is larger than the limit of {self.max_bytes} bytes")
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await _reply(send, 413, f"upload is larger than the limit of {self.max_bytes} bytes")
        field, pattern = self.fields[scope["path"]]
        if headers.get("content-type", "").startswith("multipart/form-data") and not pattern.search(body):
            return await _reply(send, 400, f"expected the image as a multipart file field named '{field}'")
        await self.app(scope, _replay(body), send)


def _replay(body: bytes):
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _reply(send, status: int, message: str) -> None:
    payload = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": payload})
