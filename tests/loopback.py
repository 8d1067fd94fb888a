"""An aiohttp application served on loopback from a daemon thread: the tests' fake and proxy servers."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from aiohttp import web


class LoopbackApp:
    """Serve ``web.Application`` on ``127.0.0.1`` (a free port) from its own thread and event loop.

    Args:
        add_routes: called with the application before it starts, to add its routes.
        client_max_size: largest request body accepted (aiohttp's default is 1 MiB).

    Attributes:
        url: ``http://127.0.0.1:<port>``; ``port``; ``loop``: the event loop the handlers run on; ``runner``: the
            ``web.AppRunner`` (another site, e.g. TLS, can be added on it).
    """

    def __init__(self, add_routes: Callable[[web.Application], None], *, client_max_size: int = 1024**2) -> None:
        self.loop = asyncio.new_event_loop()
        self._add_routes, self._client_max_size = add_routes, client_max_size
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("loopback server did not start within 10 s")
        self.url = f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application(client_max_size=self._client_max_size)
        self._add_routes(app)
        self.runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()

    def close(self) -> None:
        """Stop serving and end the thread (bounded: 10 s each)."""
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()
