"""An ASGI guard in front of the upload routes, for the requests BentoML itself mishandles.

BentoML 1.4 answers a multipart request whose file sits under another field name
with a 500 (it tries to JSON-decode the file), and it *fetches* a file field given
as text (a form value or a JSON string) as a URL: a server-side request forgery
hole. This guard lets through only multipart uploads whose file fields are real
file parts, and answers everything else, and uploads over the size limit, with a
clear 4xx before they reach the service.
"""

from __future__ import annotations

import json

Scope = dict
Message = dict


class UploadGuard:
    """Upload routes take multipart files only; JSON routes take a JSON object only (BentoML answers other
    bodies there with a 500, e.g. a multipart body of binary junk on /feedback)."""

    def __init__(
        self,
        app,
        routes: dict[str, str],
        max_bytes: int,
        json_routes: tuple[str, ...] = (),
        text_fields: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.app, self.max_bytes, self.json_routes = app, max_bytes, set(json_routes)
        self.fields = routes
        self.text_fields = text_fields or {}

    async def __call__(self, scope: Scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in self.fields.keys() | self.json_routes:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if scope["path"] in self.json_routes:
            return await self._json_route(scope, receive, send, headers)
        if int(headers.get("content-length") or 0) > self.max_bytes:
            return await _reply(send, 413, f"upload is larger than the limit of {self.max_bytes} bytes")
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await _reply(send, 413, f"upload is larger than the limit of {self.max_bytes} bytes")
        field = self.fields[scope["path"]]
        if not headers.get("content-type", "").startswith("multipart/form-data"):
            return await _reply(send, 415, f"send the scan as multipart/form-data, in a file field named '{field}'")
        if problem := await self._form_problem(scope, body, field):
            return await _reply(send, 400, problem)
        await self.app(scope, _replay(body), send)

    async def _form_problem(self, scope: Scope, body: bytes, field: str) -> str | None:
        """Why the multipart form cannot go on (no file field, text where the file belongs, an unknown field, a
        file where text belongs), or None."""
        from starlette.datastructures import UploadFile
        from starlette.requests import Request

        texts = self.text_fields.get(scope["path"], ())
        try:
            form = await Request(scope, _replay(body)).form(max_files=1000, max_fields=1000)
        except Exception as exc:  # the multipart parser's own errors vary by version; any means a malformed body
            return f"malformed multipart body ({exc.__class__.__name__})"
        try:
            if field not in form:
                return f"expected the image as a multipart file field named '{field}'"
            for name, value in form.multi_items():
                if name == field and not isinstance(value, UploadFile):
                    return f"'{field}' must be an uploaded file, not a text value (URLs are not fetched)"
                if name != field and name not in texts:
                    return f"unexpected field '{name}' (fields: {', '.join((field, *texts))})"
                if name in texts and not isinstance(value, str):
                    return f"'{name}' must be a text value, not a file"
        finally:
            await form.close()
        return None

    async def _json_route(self, scope: Scope, receive, send, headers: dict[str, str]) -> None:
        limit = 64 * 1024
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await _reply(send, 413, f"a JSON body here is at most {limit} bytes")
        if not headers.get("content-type", "").startswith("application/json"):
            return await _reply(send, 415, "send a JSON object (Content-Type: application/json)")
        try:
            if not isinstance(json.loads(body or b"{}"), dict):
                raise ValueError
        except (ValueError, UnicodeDecodeError):
            return await _reply(send, 400, "the body is not a JSON object")
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
