"""Splunk HTTP Event Collector: many alerts in one POST.

``hec+https://host:8088/services/collector/event?token_env=NAME&ca=/ca.pem&format=ecs``
The token comes from the environment variable ``token_env`` names (default
``MODELWATCH_HEC_TOKEN``), never from the URL. Options: ``format=ecs|ocsf``,
``index``, ``source``, ``sourcetype``, ``ca``, ``insecure=1``; ``hec+http://`` for
a collector without TLS.
"""

from __future__ import annotations

import socket

import msgspec

from streams.records import parse_ts
from streams.sinks.base import HTTPSink, SinkURL
from streams.sinks.formats import JSON_FORMATS, VERSION

TOKEN_ENV = "MODELWATCH_HEC_TOKEN"
EVENT_PATH = "/services/collector/event"


class SplunkHECSink(HTTPSink):
    name = "hec"
    options = ("token_env", "format", "index", "source", "sourcetype", "ca", "insecure")

    def __init__(self, url: str, token: str, *, format: str = "ecs", index: str | None = None,
                 source: str = "modelwatch", sourcetype: str | None = None, **kwargs):
        super().__init__(url, **kwargs)
        self.token = token
        self.format = format
        self.envelope = {"host": socket.gethostname(), "source": source,
                         "sourcetype": sourcetype or f"modelwatch:{format}"}
        if index:
            self.envelope["index"] = index

    @classmethod
    def from_url(cls, url: SinkURL) -> SplunkHECSink:
        target = cls.target(url, EVENT_PATH)
        sink = cls(target, url.secret("token_env", TOKEN_ENV),
                   format=url.choice("format", tuple(JSON_FORMATS), "ecs"),
                   index=url.options.get("index"),
                   source=url.options.get("source", "modelwatch"),
                   sourcetype=url.options.get("sourcetype"),
                   tls=url.tls_context() if target.startswith("https:") else None)
        sink.name = url.scheme  # hec+https or hec+http: a fixed, small label set
        return sink

    def body(self, alerts: list[dict]) -> bytes:
        """One JSON envelope per alert, concatenated: HEC's batch form."""
        shape = JSON_FORMATS[self.format]
        return b"\n".join(msgspec.json.encode(
            {"time": round(parse_ts(alert["@timestamp"]), 3), **self.envelope,
             "event": shape(alert)}) for alert in alerts)

    async def send(self, alerts: list[dict]) -> None:
        if alerts:
            await self.post(self.body(alerts), {
                "Authorization": f"Splunk {self.token}",
                "Content-Type": "application/json",
                "User-Agent": f"modelwatch/{VERSION}"})
