"""What the test servers share: a ``ThreadingHTTPServer`` on 127.0.0.1 (a free port) in a daemon thread.

Why threads rather than an asyncio server: the engines behind the servers block
(torch forward passes, ``time.sleep`` in scripted engines), a thread per
connection runs them without an event-loop bridge, and a test can drop a
connection mid-request with one ``shutdown`` call. Each server subclasses
:class:`LocalHTTPServer` and sets ``handler_class`` to its own
:class:`QuietHandler` subclass, which reaches the server object as
``self.server_state``.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Self


class QuietHandler(BaseHTTPRequestHandler):
    """Keep-alive (clients reuse connections as with a real server) and no request log in test output."""

    protocol_version = "HTTP/1.1"
    server_state: Any

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        return None


class LocalHTTPServer:
    """``with Server(...) as srv: ... srv.origin``; ``handler_class`` serves the requests."""

    handler_class: ClassVar[type[QuietHandler]]
    _httpd: ThreadingHTTPServer | None = None

    def start(self) -> Self:
        handler = type("Handler", (self.handler_class,), {"server_state": self})
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler, bind_and_activate=False)
        httpd.daemon_threads = True
        httpd.request_queue_size = 1024  # a burst of concurrent connects is queued, not refused
        httpd.server_bind()
        httpd.server_activate()
        self._httpd = httpd
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def origin(self) -> str:
        """``http://127.0.0.1:PORT`` of the running server."""
        if self._httpd is None:
            raise RuntimeError("server not started")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"
