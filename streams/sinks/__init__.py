"""Alert outputs for SIEMs besides the alerts topic: syslog/CEF, Splunk HEC, webhook, file.

``open_sinks("syslog+tls://siem:6514?ca=/ca.pem,file:///var/log/mw.jsonl")`` gives
one ``Outbox`` per URL; the worker ``offer``s each alert batch to every outbox and
``close``s them at shutdown. ``open_sink(url)`` gives the bare sink (``alerts
forward`` waits on it itself).
"""

from __future__ import annotations

from streams.sinks.base import Outbox, Sink, SinkURL, deliver, open_url
from streams.sinks.jsonl import JSONLSink
from streams.sinks.splunk_hec import TOKEN_ENV, SplunkHECSink
from streams.sinks.syslog_cef import SyslogTCPSink, SyslogTLSSink, SyslogUDPSink
from streams.sinks.webhook import WebhookSink

SINKS: dict[str, type[Sink]] = {
    "syslog+udp": SyslogUDPSink,
    "syslog+tcp": SyslogTCPSink,
    "syslog+tls": SyslogTLSSink,
    "hec+https": SplunkHECSink,
    "hec+http": SplunkHECSink,
    "webhook+https": WebhookSink,
    "webhook+http": WebhookSink,
    "file": JSONLSink,
}

#: Environment variables the sinks read by default (settings must not reject them).
SINK_ENVIRONMENT = (TOKEN_ENV,)


def open_sink(url: str) -> Sink:
    """One sink from its URL; a bad URL is a ``UserError`` naming it."""
    return open_url(SinkURL.parse(url), SINKS)


def open_sinks(text: str | None, **outbox_options) -> list[Outbox]:
    """An outbox per URL of a comma-separated list (the ``--sinks`` setting)."""
    urls = [part.strip() for part in (text or "").split(",") if part.strip()]
    return [Outbox(open_sink(url), **outbox_options) for url in urls]


__all__ = ["SINKS", "SINK_ENVIRONMENT", "Outbox", "Sink", "deliver", "open_sink", "open_sinks"]
