"""Network faults on loopback: a TCP proxy that can move, delay and swallow traffic, and
listeners that never answer."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable


class TcpProxy:
    """A loopback TCP forwarder standing in for a stable Service address (what
    kube-proxy gives a Kubernetes Service) in front of a collector that moves.

    `retarget` points it at another backend and cuts the open connections (as
    when a pod dies); `blackhole_responses` makes the open connections swallow
    whatever the backend sends (acks lost in the network); `blackhole` swallows
    both ways without closing anything (the client's host vanished). ``delay_s``
    holds back every chunk, each way, that long (a slow link: the round trip
    grows by twice that). Runs its own thread.
    """

    def __init__(self, target: str, delay_s: float = 0.0) -> None:
        self.target = target
        self.delay_s = delay_s
        self._connections: list[dict] = []
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self._thread.start()
        started.wait(10)
        self.address = f"127.0.0.1:{self._port}"

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0))
        self._port = self._server.sockets[0].getsockname()[1]
        started.set()
        self._loop.run_forever()

    async def _handle(self, client_reader, client_writer) -> None:
        host, _, port = self.target.rpartition(":")
        try:
            backend_reader, backend_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            client_writer.close()
            return
        connection = {"writers": (client_writer, backend_writer),
                      "blackhole": {"requests": False, "responses": False}}
        self._connections.append(connection)

        async def pump(reader, writer, direction: str) -> None:
            loop = asyncio.get_running_loop()
            chunks: asyncio.Queue = asyncio.Queue()  # (due time, bytes), None at the end

            async def deliver() -> None:
                while (chunk := await chunks.get()) is not None:
                    await asyncio.sleep(chunk[0] - loop.time())
                    writer.write(chunk[1])
                    await writer.drain()

            delivering = asyncio.ensure_future(deliver())
            try:
                while data := await reader.read(65536):
                    if not connection["blackhole"][direction]:
                        chunks.put_nowait((loop.time() + self.delay_s, data))
                chunks.put_nowait(None)
                await delivering
            except OSError:
                pass
            finally:
                delivering.cancel()
                for w in connection["writers"]:
                    w.close()

        await asyncio.gather(pump(client_reader, backend_writer, "requests"),
                             pump(backend_reader, client_writer, "responses"))
        self._connections.remove(connection)

    def _on_loop(self, action: Callable[[], None]) -> None:
        done = threading.Event()

        def run() -> None:
            action()
            done.set()

        self._loop.call_soon_threadsafe(run)
        done.wait(5)

    def retarget(self, target: str, *, cut: bool = True) -> None:
        """New connections go to ``target``; ``cut``: the open ones are closed."""
        def action() -> None:
            self.target = target
            for connection in self._connections if cut else ():
                for writer in connection["writers"]:
                    writer.close()

        self._on_loop(action)

    def blackhole_responses(self) -> None:
        self._blackhole("responses")

    def blackhole(self) -> None:
        self._blackhole("requests", "responses")

    def _blackhole(self, *directions: str) -> None:
        def action() -> None:
            for connection in self._connections:
                connection["blackhole"].update(dict.fromkeys(directions, True))

        self._on_loop(action)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        async def shutdown() -> None:
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loop.stop()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        self._thread.join(5)


class Blackhole:
    """A loopback address where connecting hangs: ``accepts`` (the default) completes the
    TCP handshake and then never says a word; otherwise the listen queue is kept full, so
    a connection is never even accepted (SYNs go unanswered, as behind a dropping
    firewall). Nothing is ever read or closed until `close`."""

    def __init__(self, *, accepts: bool = True) -> None:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        # The kernel completes up to backlog + 1 handshakes nobody accepts.
        self._listener.listen(64 if accepts else 0)
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._fillers = [] if accepts else [
            socket.create_connection(self._listener.getsockname(), timeout=5)]

    def close(self) -> None:
        for s in (*self._fillers, self._listener):
            s.close()

    def __enter__(self) -> Blackhole:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
