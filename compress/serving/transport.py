"""uvicorn's HTTP/1.1 protocol (h11) with what a server facing untrusted clients needs on top.

Standalone (uvicorn and h11): the runtime images copy it beside server.py.

- A deadline for the request's headers, from the moment the connection opens or the last answer went out:
  uvicorn's keep-alive timer restarts on every byte received, so a client sending one byte a second would
  hold its connection for ever. Past the deadline the connection gets a 408 (when it sent something) and is
  closed. The body has its own deadline in the application (--request-timeout).
- Malformed HTTP (h11 refuses a signed, underscored or conflicting Content-Length, a bad request line, headers
  over the size limit) answered with the same one-line JSON error as every other client error, not text.

h11's parsing is strict and maintained; what is added here uses uvicorn's documented way to plug a protocol
class (`Config(http=...)`) and two of its methods (connection_made, data_received, on_response_complete and
send_400_response), pinned by the version in pyproject.toml and exercised by tests/test_server_http.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def raw_response(status: int, reason: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class GuardedH11Protocol(H11Protocol):
    """H11Protocol with a deadline for request headers and JSON answers to malformed HTTP."""

    header_timeout_s = 10.0  # set by the server from --header-timeout before it starts
    max_header_bytes = 16384

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # An answer goes out in two writes (head, body): with Nagle's algorithm the second waits for the
            # client's delayed ACK, 40 ms a request (measured). asyncio sets this only for sockets it creates.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._header_timer: asyncio.TimerHandle | None = None
        self._seen = False
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._seen = False
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if getattr(self, "_header_timer", None) is not None:
            self._header_timer.cancel()  # type: ignore[union-attr]
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return  # the request is in: the application's own deadline runs from here
        if self._seen:
            message = f"the request headers did not arrive within {self.header_timeout_s:g} s"
            self.transport.write(raw_response(408, "Request Timeout", message))
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        self._seen = self._seen or bool(data)
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm()  # the next request's headers have their own deadline

    def send_400_response(self, msg: str) -> None:  # noqa: ARG002 (uvicorn's text is replaced by ours)
        self._disarm()
        message = (
            "malformed HTTP request: a bad request line or header, a Content-Length that is not plain digits "
            f"or is given twice, or headers over {self.max_header_bytes} bytes"
        )
        self.transport.write(raw_response(400, "Bad Request", message))
        self.transport.close()
