"""TCP proxies: a plain one, which stands for a server that is down until it is started, and
a TLS-terminating one. Tansu 0.6.0 takes `--cert` and `--key` but cannot be given both (clap
puts them in one exclusive group) and never wraps its connections in TLS, so the TLS
endpoint that the clients see is a proxy, in front of a Tansu that advertises the proxy's
address."""

from __future__ import annotations

import asyncio
import ssl
import threading
from pathlib import Path

from tests.own_kafka import free_port


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    except (ConnectionError, ssl.SSLError):
        pass  # either side went away: the other is closed below
    finally:
        dst.close()


class TcpProxy:
    """Accepts on 127.0.0.1:`port` (wrapped in TLS when given a context) and relays the
    plaintext to 127.0.0.1:`upstream_port` once started; until then nothing listens there,
    as with a server that is down. `handshakes` counts accepted connections."""

    def __init__(self, context: ssl.SSLContext | None = None) -> None:
        self.port = free_port()
        self.upstream_port: int | None = None
        self.handshakes = 0
        self._context = context
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy",
                                        daemon=True)
        self._server: asyncio.Server | None = None

    def start(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(asyncio.start_server(
            self._serve, "127.0.0.1", self.port, ssl=self._context), self._loop).result(10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Called once the TLS handshake (if any) succeeded.
        self.handshakes += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1",
                                                                 self.upstream_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()


class TlsProxy(TcpProxy):
    """Accepts TLS on 127.0.0.1:`port` with the given certificate chain (and key, unless the
    chain's file holds it), and relays the plaintext to 127.0.0.1:`upstream_port`."""

    def __init__(self, cert_chain: Path, key: Path | None = None) -> None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert_chain, key)
        super().__init__(context)
