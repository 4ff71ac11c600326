"""Syslog (RFC 5424) carrying CEF, over UDP, TCP or TLS.

``syslog+udp://host[:514]``: one datagram per alert (RFC 5426).
``syslog+tcp://host[:514]``: octet-counting frames, ``<len> <message>`` (RFC 6587).
``syslog+tls://host[:6514][?ca=/ca.pem][&insecure=1]``: the same frames over TLS
(RFC 5425); the server certificate is verified unless ``insecure=1``.
Every scheme takes ``facility=local0`` (default) … ``local7``, or a number 0..23, and
``max_bytes``: the largest message (over UDP: datagram payload) it sends, 2,048
octets over UDP (what RFC 5426 says every receiver SHOULD take) and 8,192 over TCP
and TLS (RFC 5425's SHOULD). A longer alert is cut to fit, its input-sized fields
first, and says so (CEF ``cn2`` = characters cut); it is never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl

from streams.alerts import syslog_severity
from streams.sinks.base import Sink, SinkURL
from streams.sinks.formats import CUT, cef

log = logging.getLogger("modelwatch.sinks")

APP_NAME = "modelwatch"
FACILITIES = {name: code for code, name in enumerate(
    ("kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron",
     "authpriv", "ftp", "ntp", "audit", "alert", "clock"))} | \
    {f"local{i}": 16 + i for i in range(8)}
BOM = b"\xef\xbb\xbf"
MIN_MESSAGE_BYTES = 480          # RFC 5426: every IPv4 receiver MUST take this much
MAX_DATAGRAM_BYTES = 65_507      # the largest UDP payload over IPv4
MAX_STREAM_MESSAGE_BYTES = 1 << 20
# Ever smaller caps on the input-sized CEF fields, until a message fits.
SHRINK_STEPS = (1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125, 0.0)


def _printable(text: str, limit: int) -> str:
    """RFC 5424 header fields are printable US-ASCII without spaces, or ``-``."""
    kept = "".join(ch for ch in text if 33 <= ord(ch) <= 126)[:limit]
    return kept or "-"


def _msg(text: str) -> bytes:
    """RFC 5424 MSG: plain ASCII as is (CEF receivers look for ``CEF:`` first), any
    other text as UTF-8 after the BOM, as §6.4 requires."""
    data = text.encode()
    return data if data.isascii() else BOM + data


def _cut_bytes(data: bytes, size: int) -> bytes:
    """The first ``size`` bytes of UTF-8 text, at a character boundary and not inside
    a CEF escape, with the cut mark."""
    mark = CUT.encode()
    text = data[:max(0, size - len(mark))].decode("utf-8", errors="ignore")  # a split char
    backslashes = len(text) - len(text.rstrip("\\"))
    if backslashes % 2:
        text = text[:-1]  # half an escape would escape the mark
    return text.encode() + mark


def syslog_message(alert: dict, *, facility: int = FACILITIES["local0"],
                   hostname: str | None = None, max_bytes: int | None = None) -> bytes:
    """``<PRI>1 TIMESTAMP HOSTNAME modelwatch - MSGID - CEF:0|…``, at most ``max_bytes``.

    TIMESTAMP is when the alert was made (``event.created``), MSGID its rule
    category. The MSG has the BOM only when it is not plain ASCII. Over
    ``max_bytes``, the CEF's input-sized fields are capped ever shorter until it
    fits; only a size too small even for the fixed fields cuts the message's tail.
    """
    pri = facility * 8 + syslog_severity(alert["event"]["severity"])
    timestamp = _printable(alert["event"].get("created") or "-", 64)
    host = _printable(hostname if hostname is not None else socket.gethostname(), 255)
    msgid = _printable(alert["rule"]["category"], 32)
    head = f"<{pri}>1 {timestamp} {host} {APP_NAME} - {msgid} - ".encode()
    for shrink in SHRINK_STEPS:
        message = head + _msg(cef(alert, shrink=shrink))
        if max_bytes is None or len(message) <= max_bytes:
            return message
    body = message[len(head):]
    bom = BOM if body.startswith(BOM) else b""
    return head + bom + _cut_bytes(body[len(bom):], max_bytes - len(head) - len(bom))


def octet_frame(message: bytes) -> bytes:
    return b"%d %s" % (len(message), message)


class SyslogSink(Sink):
    options = ("facility", "max_bytes")
    default_port = 514
    default_max_bytes = 8192
    largest_max_bytes = MAX_STREAM_MESSAGE_BYTES

    def __init__(self, host: str, port: int, *, facility: int = FACILITIES["local0"],
                 max_bytes: int | None = None):
        self.host, self.port, self.facility = host, port, facility
        self.max_bytes = max_bytes if max_bytes is not None else self.default_max_bytes
        self.hostname = socket.gethostname()
        self.truncated = 0  # alerts cut to fit max_bytes

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
        size = url.options.get("max_bytes", str(cls.default_max_bytes))
        if not size.isdigit() or not MIN_MESSAGE_BYTES <= int(size) <= cls.largest_max_bytes:
            raise url.error(f"max_bytes={size!r}: expected a number "
                            f"{MIN_MESSAGE_BYTES}..{cls.largest_max_bytes}")
        return cls(url.host, url.port or cls.default_port, facility=facility,
                   max_bytes=int(size), **cls._extra(url))

    @classmethod
    def _extra(cls, url: SinkURL) -> dict:
        return {}

    def message(self, alert: dict) -> bytes:
        message = syslog_message(alert, facility=self.facility, hostname=self.hostname,
                                 max_bytes=self.max_bytes)
        if b"cn2Label=truncatedChars " in message or message.endswith(CUT.encode()):
            self.truncated += 1
            log.warning("sink %s: alert %s cut to %d bytes (max_bytes)", self.name,
                        alert["event"]["id"], len(message))
        return message


class SyslogUDPSink(SyslogSink):
    """One datagram per alert, sent on a connected socket: an error of the send (a
    datagram too big, a refused port reported by ICMP) raises from the ``send`` of
    the batch that carried it, so those alerts count as failed and are sent again."""

    name = "syslog+udp"
    default_max_bytes = 2048
    largest_max_bytes = MAX_DATAGRAM_BYTES

    def __init__(self, host: str, port: int, **kwargs):
        super().__init__(host, port, **kwargs)
        self._socket: socket.socket | None = None

    async def _connect(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            sock.connect(address)  # UDP: no packet, just the peer for send()
        except BaseException:
            sock.close()
            raise
        return sock

    async def send(self, alerts: list[dict]) -> None:
        if self._socket is None:
            self._socket = await self._connect()
        loop = asyncio.get_running_loop()
        try:
            for alert in alerts:
                await loop.sock_sendall(self._socket, self.message(alert))
        except OSError:
            await self.close()
            raise

    async def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
        self._socket = None


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
    options = ("facility", "max_bytes", "ca", "insecure")
    default_port = 6514

    @classmethod
    def _extra(cls, url: SinkURL) -> dict:
        return {"tls": url.tls_context()}
