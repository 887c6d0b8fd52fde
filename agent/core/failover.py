"""Which collector a job streams to, and when to try another.

Every task of a job ranks the collector replicas by the job's name
(`gradwatch.agent.core.endpoints.rank`) and connects to the first. A connection
that fails (unreachable, refused registration, broken or ended stream, no
acknowledgement in time) moves on to the next replica; when every replica failed,
the sender waits with exponential backoff (``flush_interval_s`` doubling to 5 s,
jitter ±50 %; the sender keeps draining the sessions meanwhile) and starts over from
the preferred one. While on a fallback, the preferred replicas' gRPC health is checked
every ``failback_interval_s`` (±20 %); once one is SERVING the connection flushes,
closes its sessions there and moves back, so all tasks of a job converge on one
collector. Sender thread (its event loop) only.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gradwatch.agent.core.channel import ChannelSettings
from gradwatch.agent.core.endpoints import DNS_SCHEME, Endpoint, rank, resolve, unresolved
from gradwatch.agent.core.stream import Outcome
from gradwatch.proto.v1 import gradwatch_pb2 as pb

log = logging.getLogger(__name__)
T = TypeVar("T")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GradientWatch"].full_name
MAX_BACKOFF_S = 5.0

#: A coroutine function that returns once the job's preferred collector is back.
Failback = Callable[[], Awaitable[None]]
#: ``connect(endpoint, failback)``: one connection (``failback`` None on the preferred
#: replica). Returns how it ended and whether it got as far as streaming.
Connect = Callable[[Endpoint, Failback | None], Awaitable[tuple[Outcome, bool]]]


class Failover:
    def __init__(self, targets: list[str], training_job: str, channel: ChannelSettings, *,
                 flush_interval_s: float, failback_interval_s: float,
                 rpc_timeout_s: float) -> None:
        self.targets = targets
        self.training_job = training_job
        self.channel = channel
        self.flush_interval_s = flush_interval_s
        self.failback_interval_s = failback_interval_s
        self.rpc_timeout_s = rpc_timeout_s

    async def run(self, connect: Connect, finished: Callable[[], bool]) -> None:
        """Connects until a connection is `Outcome.DONE` or ``finished()`` (the sender
        drains the sessions meanwhile, whatever the connection does)."""
        backoff = self.flush_interval_s
        while True:
            endpoints = rank(await self.resolve(), self.training_job)
            for preference, endpoint in enumerate(endpoints):
                preferred = endpoints[:preference]

                def attempt(endpoint=endpoint, preferred=preferred):
                    return connect(endpoint, (lambda: self.preferred_is_back(preferred))
                                   if preferred else None)

                outcome, streamed = await attempt()
                if outcome is Outcome.LOST:  # the collector restarted: register again at once
                    outcome, streamed = await attempt()
                while outcome is Outcome.REFUSED:  # a batch was refused and dropped: the rest
                    outcome, streamed = await attempt()
                if outcome is Outcome.DONE or finished():
                    return
                if outcome is Outcome.FAILBACK:
                    break
                if streamed:  # it worked until now: back off from scratch
                    backoff = self.flush_interval_s
            else:  # every replica failed
                await asyncio.sleep(backoff * random.uniform(0.5, 1.5))
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    async def resolve(self) -> list[Endpoint]:
        """The replicas. ``dns:///`` names are looked up in a thread of their own for at
        most ``rpc_timeout_s``: a DNS server that does not answer must not hold up the
        sender's loop, which empties the device buffers. Names not resolved in time, or
        while the interpreter exits (no new threads then), are left to gRPC."""
        if not any(target.startswith(DNS_SCHEME) for target in self.targets):
            return resolve(self.targets)
        try:
            return await asyncio.wait_for(_in_daemon_thread(resolve, self.targets),
                                          self.rpc_timeout_s)
        except (asyncio.TimeoutError, RuntimeError) as error:
            log.debug("gradwatch: %s not looked up: %s", self.targets,
                      error or f"no DNS answer in {self.rpc_timeout_s:g} s")
            return unresolved(self.targets)

    async def preferred_is_back(self, preferred: list[Endpoint]) -> None:
        """Returns once a replica of ``preferred`` reports SERVING."""
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        while True:
            await asyncio.sleep(self.failback_interval_s * random.uniform(0.8, 1.2))
            for endpoint in preferred:
                try:
                    async with self.channel.open(endpoint) as channel:
                        response = await health_pb2_grpc.HealthStub(channel).Check(
                            request, timeout=self.rpc_timeout_s)
                except (grpc.aio.AioRpcError, OSError):
                    continue
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    log.info("gradwatch: collector %s is back; moving there", endpoint)
                    return


def _in_daemon_thread(function: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """``function(*args)`` in a daemon thread of its own: unlike the loop's executor, a
    lookup that never returns does not hold up the process's exit. Raises RuntimeError
    where no thread can start (the interpreter is exiting)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():  # given up on meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result, error = function(*args), None
        except Exception as caught:
            result, error = None, caught
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    threading.Thread(target=run, name="gradwatch-lookup", daemon=True).start()
    return future
