"""Webhook: one JSON POST per alert, optionally signed.

``webhook+https://host/path?secret_env=NAME&format=ecs|ocsf&ca=/ca.pem``
With ``secret_env`` each request carries ``X-Modelwatch-Signature:
sha256=<hex HMAC-SHA256 of the body>``, keyed by that environment variable's
value, so the receiver can check who sent it. ``X-Modelwatch-Event-Id`` lets it
drop repeats (delivery is at least once).
"""

from __future__ import annotations

import hashlib
import hmac

import msgspec

from streams.sinks.base import HTTPSink, SinkURL
from streams.sinks.formats import JSON_FORMATS, VERSION

SIGNATURE_HEADER = "X-Modelwatch-Signature"


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookSink(HTTPSink):
    name = "webhook"
    options = ("secret_env", "format", "ca", "insecure")

    def __init__(self, url: str, *, secret: str | None = None, format: str = "ecs", **kwargs):
        super().__init__(url, **kwargs)
        self.secret = secret
        self.format = format

    @classmethod
    def from_url(cls, url: SinkURL) -> WebhookSink:
        target = cls.target(url)
        sink = cls(target, secret=url.secret("secret_env"),
                   format=url.choice("format", tuple(JSON_FORMATS), "ecs"),
                   tls=url.tls_context() if target.startswith("https:") else None)
        sink.name = url.scheme
        return sink

    async def send(self, alerts: list[dict]) -> None:
        shape = JSON_FORMATS[self.format]
        for alert in alerts:
            body = msgspec.json.encode(shape(alert))
            headers = {"Content-Type": "application/json", "User-Agent": f"modelwatch/{VERSION}",
                       "X-Modelwatch-Event-Id": alert["event"]["id"]}
            if self.secret is not None:
                headers[SIGNATURE_HEADER] = signature(self.secret, body)
            await self.post(body, headers)
