"""Syslog (RFC 5424) carrying CEF, over UDP, TCP or TLS.

``syslog+udp://host[:514]``: one datagram per alert (RFC 5426).
``syslog+tcp://host[:514]``: octet-counting frames, ``<len> <message>`` (RFC 6587).
``syslog+tls://host[:6514][?ca=/ca.pem][&insecure=1]``: the same frames over TLS
(RFC 5425); the server certificate is verified unless ``insecure=1``.
Every scheme takes ``facility=local0`` (default) … ``local7``, or a number 0..23.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

from streams.sinks.base import Sink, SinkURL
from streams.sinks.formats import cef, syslog_severity

APP_NAME = "modelwatch"
FACILITIES = {name: code for code, name in enumerate(
    ("kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron",
     "authpriv", "ftp", "ntp", "audit", "alert", "clock"))} | \
    {f"local{i}": 16 + i for i in range(8)}


def _printable(text: str, limit: int) -> str:
    """RFC 5424 header fields are printable US-ASCII without spaces, or ``-``."""
    kept = "".join(ch for ch in text if 33 <= ord(ch) <= 126)[:limit]
    return kept or "-"


def syslog_message(alert: dict, *, facility: int = FACILITIES["local0"],
                   hostname: str | None = None) -> bytes:
    """``<PRI>1 TIMESTAMP HOSTNAME modelwatch - MSGID - CEF:0|…``.

    TIMESTAMP is when the alert was made (``event.created``), MSGID its rule
    category. There is no BOM before the message: CEF receivers expect ``CEF:``
    first, and RFC 5424 allows a MSG without one.
    """
    pri = facility * 8 + syslog_severity(alert["event"]["severity"])
    timestamp = alert["event"].get("created") or "-"
    host = _printable(hostname if hostname is not None else socket.gethostname(), 255)
    msgid = _printable(alert["rule"]["category"], 32)
    return f"<{pri}>1 {timestamp} {host} {APP_NAME} - {msgid} - {cef(alert)}".encode()


def octet_frame(message: bytes) -> bytes:
    return b"%d %s" % (len(message), message)


class SyslogSink(Sink):
    options = ("facility",)
    default_port = 514

    def __init__(self, host: str, port: int, *, facility: int = FACILITIES["local0"]):
        self.host, self.port, self.facility = host, port, facility
        self.hostname = socket.gethostname()

    @classmethod
    def from_url(cls, url: SinkURL) -> SyslogSink:
        if not url.host:
            raise url.error("needs a host: " + cls.name + "://host:port")
        if url.path not in ("", "/"):
            raise url.error(f"takes no path ({url.path!r})")
        name = url.options.get("facility", "local0")
        facility = FACILITIES.get(name, int(name) if name.isdigit() else -1)
        if not 0 <= facility <= 23:
            raise url.error(f"facility={name!r}: expected local0..local7 or a number 0..23")
        return cls(url.host, url.port or cls.default_port, facility=facility,
                   **cls._extra(url))

    @classmethod
    def _extra(cls, url: SinkURL) -> dict:
        return {}

    def message(self, alert: dict) -> bytes:
        return syslog_message(alert, facility=self.facility, hostname=self.hostname)


class _DatagramErrors(asyncio.DatagramProtocol):
    """Keeps the last ICMP error (e.g. port unreachable) for the next send to raise."""

    def __init__(self):
        self.error: OSError | None = None

    def error_received(self, exc: OSError) -> None:
        self.error = exc


class SyslogUDPSink(SyslogSink):
    name = "syslog+udp"

    def __init__(self, host: str, port: int, **kwargs):
        super().__init__(host, port, **kwargs)
        self._transport: asyncio.DatagramTransport | None = None
        self._protocol: _DatagramErrors | None = None

    async def send(self, alerts: list[dict]) -> None:
        if self._protocol is not None and self._protocol.error is not None:
            error = self._protocol.error
            await self.close()
            raise error
        if self._transport is None:
            loop = asyncio.get_running_loop()
            self._transport, self._protocol = await loop.create_datagram_endpoint(
                _DatagramErrors, remote_addr=(self.host, self.port))
        for alert in alerts:
            self._transport.sendto(self.message(alert))

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._transport = self._protocol = None


class SyslogTCPSink(SyslogSink):
    name = "syslog+tcp"

    def __init__(self, host: str, port: int, *, tls: ssl.SSLContext | None = None, **kwargs):
        super().__init__(host, port, **kwargs)
        self.tls = tls
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def send(self, alerts: list[dict]) -> None:
        frames = b"".join(octet_frame(self.message(alert)) for alert in alerts)
        # A syslog server never writes back: end of stream means it closed on us,
        # and writing into that socket would lose the batch without an error.
        if self._reader is not None and self._reader.at_eof():
            self._drop()
        try:
            if self._writer is None:
                self._reader, self._writer = await asyncio.open_connection(
                    self.host, self.port, ssl=self.tls,
                    server_hostname=self.host if self.tls else None)
            self._writer.write(frames)
            await self._writer.drain()
        except BaseException:  # also a cancelled send: the stream may hold half a frame
            self._drop()
            raise

    def _drop(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def close(self) -> None:
        writer = self._writer
        self._drop()
        if writer is not None:
            with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):  # closing anyway
                async with asyncio.timeout(5.0):
                    await writer.wait_closed()


class SyslogTLSSink(SyslogTCPSink):
    name = "syslog+tls"
    options = ("facility", "ca", "insecure")
    default_port = 6514

    @classmethod
    def _extra(cls, url: SinkURL) -> dict:
        return {"tls": url.tls_context()}
