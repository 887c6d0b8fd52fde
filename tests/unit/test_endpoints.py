"""Collector addresses, DNS expansion and rendezvous ranking (agent side, no network).

DNS is the one thing faked here (``socket.getaddrinfo``): a name with several
addresses, as a Kubernetes headless Service gives, cannot be created on loopback.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter

import pytest

from gradwatch.agent.core.channel import ChannelSettings
from gradwatch.agent.core.endpoints import Endpoint, parse_targets, rank, resolve
from gradwatch.agent.core.failover import Failover


def test_parse_accepts_one_address_a_list_and_a_dns_name():
    assert parse_targets("c:8470") == ["c:8470"]
    assert parse_targets("a:1, b:2,") == ["a:1", "b:2"]
    assert parse_targets("dns:///collector.ns.svc:8470") == ["dns:///collector.ns.svc:8470"]
    assert parse_targets("[::1]:8470") == ["[::1]:8470"]


@pytest.mark.parametrize("bad", ["", "c", "c:", ":8470", "c:http", "a:1,b", "c:99999", "c:0",
                                 "http://c:8470", "[::1:8470"])
def test_parse_rejects_what_is_not_host_port(bad):
    with pytest.raises(ValueError, match="collector address"):
        parse_targets(bad)


def test_dns_name_expands_into_one_endpoint_per_address(monkeypatch):
    def getaddrinfo(host, port, type=0):
        assert (host, port) == ("collector-headless", 8470)
        return [(socket.AF_INET, type, 6, "", (ip, port))
                for ip in ("10.0.0.7", "10.0.0.5", "10.0.0.7")] + [
                (socket.AF_INET6, type, 6, "", ("fd00::1", port, 0, 0))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    endpoints = resolve(["dns:///collector-headless:8470", "static:1"])
    assert endpoints == [Endpoint("10.0.0.5:8470", "collector-headless:8470"),
                         Endpoint("10.0.0.7:8470", "collector-headless:8470"),
                         Endpoint("[fd00::1]:8470", "collector-headless:8470"),
                         Endpoint("static:1", "static:1")]


def test_unresolvable_dns_name_is_kept_so_grpc_can_say_why(monkeypatch):
    def getaddrinfo(*args, **kwargs):
        raise socket.gaierror("Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    assert resolve(["dns:///nowhere:1"]) == [Endpoint("nowhere:1", "nowhere:1")]


def test_a_dns_server_that_does_not_answer_holds_up_the_sender_loop_at_most_a_timeout(
        monkeypatch):
    """The sender's event loop also empties the device buffers every flush interval: a
    lookup that hangs runs in a daemon thread (so it cannot delay the process's exit
    either), and after the RPC timeout the name is left to gRPC (which says why it cannot
    connect)."""
    answer = threading.Event()

    def getaddrinfo(*args, **kwargs):
        answer.wait(10)  # a DNS server that does not answer
        raise socket.gaierror("Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    failover = Failover(["dns:///collector-headless:8470", "static:1"], "job",
                        ChannelSettings(), flush_interval_s=0.05, failback_interval_s=1.0,
                        rpc_timeout_s=0.3)

    async def resolve_while_ticking():
        ticks = 0

        async def tick():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.ensure_future(tick())
        start = time.monotonic()
        endpoints = await failover.resolve()
        elapsed = time.monotonic() - start
        ticker.cancel()
        lookups = [t for t in threading.enumerate() if t.name == "gradwatch-lookup"]
        answer.set()  # let the lookup's thread end
        return endpoints, elapsed, ticks, lookups

    endpoints, elapsed, ticks, lookups = asyncio.run(resolve_while_ticking())
    assert lookups and all(t.daemon for t in lookups), "a hung lookup must not delay exit"
    assert endpoints == [Endpoint("collector-headless:8470", "collector-headless:8470"),
                         Endpoint("static:1", "static:1")]
    assert 0.3 <= elapsed < 2.0, elapsed
    assert ticks >= 10, "the loop ran while the name was looked up"


REPLICAS = [Endpoint(f"10.0.0.{i}:8470", "c:8470") for i in range(1, 4)]


def test_every_task_of_a_job_ranks_replicas_the_same_whatever_their_order():
    for job in ("run-a", "run-b", "run-c"):
        assert rank(REPLICAS, job) == rank(list(reversed(REPLICAS)), job)


def test_jobs_spread_over_replicas():
    first = Counter(rank(REPLICAS, f"run-{i}")[0] for i in range(3000))
    assert set(first) == set(REPLICAS)
    assert min(first.values()) > 800  # ~1000 each


def test_losing_a_replica_moves_only_its_own_jobs_to_their_next_choice():
    jobs = [f"run-{i}" for i in range(300)]
    before = {job: rank(REPLICAS, job) for job in jobs}
    survivors = REPLICAS[:2]
    for job in jobs:
        after = rank(survivors, job)
        if before[job][0] in survivors:
            assert after[0] == before[job][0], "a job on a surviving replica stays"
        else:
            assert after[0] == before[job][1], "a moved job goes to its second choice"


def test_token_file_is_read_for_every_connection(tmp_path):
    token = tmp_path / "token"
    token.write_text("first\n")
    settings = ChannelSettings(token_file=str(token))
    assert settings.metadata() == (("authorization", "Bearer first"),)
    token.write_text("second")
    assert settings.metadata() == (("authorization", "Bearer second"),)
    assert ChannelSettings().metadata() == ()
