"""/metrics behind a Prometheus web-config file: TLS, basic auth and client certificates, with
real collector and Prometheus processes; the file and the certificates rotate without a
restart, an invalid file stops the collector at start, and no secret reaches the log."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request

import bcrypt
import pytest

from tests.support.certificates import make_certificates
from tests.support.services import CollectorProcess, PrometheusProcess, require_binary

pytestmark = pytest.mark.integration

PASSWORD = "Scrape-Pa55word-91f3"
WRONG_PASSWORD = "Wrong-Pa55word-27c8"
#: Failures of a connection or handshake (not an HTTP answer).
CONNECTION_FAILED = (ConnectionError, ssl.SSLError, http.client.HTTPException,
                     urllib.error.URLError)


def bcrypt_hash(password: str, rounds: int = 4) -> str:
    """Cost 4 keeps tests fast; htpasswd and Prometheus' docs use 10 or more."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=rounds)).decode()


def write_web_config(folder, **data) -> str:
    """Writes the web-config file atomically (as Kubernetes updates a mounted Secret)."""
    tmp = folder / ".web.yml.tmp"
    tmp.write_text(json.dumps(data))  # JSON is YAML
    os.replace(tmp, folder / "web.yml")
    return str(folder / "web.yml")


def tls_server_config(certs, **extra) -> dict:
    return {"cert_file": certs.server_cert.name, "key_file": certs.server_key.name, **extra}


def client_context(ca, client=None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if client is not None:
        context.load_cert_chain(client.client_cert, client.client_key)
    return context


def status(collector, context=None, auth=None) -> int:
    """The HTTP status of a scrape (200 or the error's)."""
    try:
        collector.scrape(context=context, auth=auth)
        return 200
    except urllib.error.HTTPError as error:
        return error.code


def untrusted(error: urllib.error.URLError) -> bool:
    """Whether the client refused the server's certificate."""
    return isinstance(error.reason, ssl.SSLCertVerificationError)


def assert_no_secret_in(log: str, *secrets: str) -> None:
    for secret in secrets:
        assert secret not in log, f"a secret is in the collector log:\n{log}"


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def password_hash() -> str:
    return bcrypt_hash(PASSWORD, rounds=10)  # a realistic cost, to show it is paid once


@pytest.fixture(scope="module")
def guarded(certs, password_hash):
    """A collector with TLS and basic auth (user prometheus), logging at DEBUG."""
    path = write_web_config(certs.ca.parent, tls_server_config=tls_server_config(certs),
                            basic_auth_users={"prometheus": password_hash})
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADWATCH_LOG_LEVEL", "DEBUG")
        with CollectorProcess("--web-config-file", path) as collector:
            yield collector
            assert collector.process.poll() is None, f"collector died:\n{collector.log()}"


def test_https_and_a_password_are_required(guarded, certs):
    assert guarded.metrics_url.startswith("https://127.0.0.1:")
    assert "metrics on https://127.0.0.1:" in guarded.log()
    with pytest.raises(CONNECTION_FAILED):
        urllib.request.urlopen(guarded.metrics_url.replace("https://", "http://"), timeout=5)
    with pytest.raises(urllib.error.URLError) as error:  # a CA the client does not trust
        guarded.scrape(context=ssl.create_default_context())
    assert untrusted(error.value)
    context = client_context(certs.ca)
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        guarded.scrape(context=context)
    assert anonymous.value.code == 401
    assert anonymous.value.headers["WWW-Authenticate"] == 'Basic realm="gradwatch"'
    assert status(guarded, context, ("prometheus", WRONG_PASSWORD)) == 401
    assert status(guarded, context, ("grafana", PASSWORD)) == 401
    text = guarded.scrape(context=context, auth=("prometheus", PASSWORD))
    assert "gradwatch_collector_sessions" in text
    # /healthz is guarded too, as every path is in Prometheus' exporter-toolkit
    healthz = guarded.metrics_url.replace("/metrics", "/healthz")
    with pytest.raises(urllib.error.HTTPError, match="401"):
        urllib.request.urlopen(healthz, timeout=5, context=context)


def median_scrape_s(collector, context, auth, times: int = 9) -> float:
    durations = []
    for _ in range(times):
        started = time.perf_counter()
        status(collector, context, auth)
        durations.append(time.perf_counter() - started)
    return sorted(durations)[times // 2]


def test_correct_scrapes_do_not_pay_bcrypt_each_time(guarded, certs, password_hash):
    context = client_context(certs.ca)
    started = time.perf_counter()
    bcrypt.checkpw(PASSWORD.encode(), password_hash.encode())
    bcrypt_s = time.perf_counter() - started
    guarded.scrape(context=context, auth=("prometheus", PASSWORD))
    correct_s = median_scrape_s(guarded, context, ("prometheus", PASSWORD))
    wrong_s = median_scrape_s(guarded, context, ("prometheus", WRONG_PASSWORD))
    assert wrong_s > bcrypt_s / 2, (wrong_s, bcrypt_s)  # every wrong password pays bcrypt
    assert correct_s < bcrypt_s / 3, (correct_s, bcrypt_s)  # a remembered one does not


def test_prometheus_scrapes_with_tls_and_basic_auth(guarded, certs):
    require_binary("prometheus")
    target = guarded.metrics_url.removeprefix("https://").removesuffix("/metrics")
    tls = {"scheme": "https", "tls_config": {"ca_file": str(certs.ca)}}
    with PrometheusProcess([target], scrape_options={
            **tls, "basic_auth": {"username": "prometheus", "password": PASSWORD}}) as good, \
            PrometheusProcess([target], scrape_options={
                **tls, "basic_auth": {"username": "prometheus",
                                      "password": WRONG_PASSWORD}}) as wrong:
        assert good.wait_for('up{job="gradwatch"} == 1')
        (sessions,) = good.wait_for('gradwatch_collector_sessions{job="gradwatch"}')
        assert float(sessions["value"][1]) >= 0
        assert wrong.wait_for('up{job="gradwatch"} == 0')
        (target_status,) = wrong.get_json("/api/v1/targets")["data"]["activeTargets"]
        assert "401" in target_status["lastError"], target_status


def test_no_password_or_hash_in_the_log(guarded, password_hash):
    log = guarded.log()
    assert "DEBUG" in log and "basic auth on (1 user)" in log
    assert_no_secret_in(log, PASSWORD, WRONG_PASSWORD, password_hash, password_hash[7:])


def test_users_and_certificate_rotate_without_restart(tmp_path):
    live, other = tmp_path / "live", tmp_path / "other"
    live.mkdir()
    other.mkdir()
    first = make_certificates(tmp_path)
    for pem in (first.server_cert, first.server_key):
        shutil.copy(pem, live / pem.name)
    old_hash, new_hash = bcrypt_hash("old-Pa55word-0a1"), bcrypt_hash("new-Pa55word-b2c")
    path = write_web_config(live, tls_server_config=tls_server_config(first),
                            basic_auth_users={"old": old_hash})
    with CollectorProcess("--web-config-file", path) as collector:
        pid = collector.process.pid
        context = client_context(first.ca)
        assert status(collector, context, ("old", "old-Pa55word-0a1")) == 200
        assert status(collector, context, ("new", "new-Pa55word-b2c")) == 401

        write_web_config(live, tls_server_config=tls_server_config(first),
                         basic_auth_users={"new": new_hash})
        rotated = time.monotonic()
        while status(collector, context, ("new", "new-Pa55word-b2c")) != 200:
            assert time.monotonic() - rotated < 2.0, collector.log()
            time.sleep(0.05)
        assert status(collector, context, ("old", "old-Pa55word-0a1")) == 401

        # A broken file keeps the previous settings and says why, without the hash.
        broken = new_hash[:-1]
        write_web_config(live, tls_server_config=tls_server_config(first),
                         basic_auth_users={"new": broken})
        deadline = time.monotonic() + 3
        while "keeping the previous settings" not in collector.log():
            assert time.monotonic() < deadline, collector.log()
            time.sleep(0.05)
        assert "basic_auth_users.new: expected a bcrypt hash" in collector.log()
        assert status(collector, context, ("new", "new-Pa55word-b2c")) == 200

        # A new certificate from another CA: new handshakes present it (same SSLContext).
        second = make_certificates(other)
        for source, name in ((second.server_key, first.server_key.name),
                             (second.server_cert, first.server_cert.name)):
            shutil.copy(source, live / f".{name}.tmp")
            os.replace(live / f".{name}.tmp", live / name)
        write_web_config(live, tls_server_config=tls_server_config(first),
                         basic_auth_users={"new": new_hash})
        new_context = client_context(second.ca)
        rotated = time.monotonic()
        while True:
            try:
                collector.scrape(context=new_context, auth=("new", "new-Pa55word-b2c"))
                break
            except urllib.error.URLError as error:
                assert untrusted(error) and time.monotonic() - rotated < 2.0, collector.log()
                time.sleep(0.05)
        with pytest.raises(urllib.error.URLError) as error:
            collector.scrape(context=client_context(first.ca))
        assert untrusted(error.value)
        assert collector.process.pid == pid and collector.process.poll() is None
        assert collector.log().count("reloaded") >= 2
        assert_no_secret_in(collector.log(), "old-Pa55word-0a1", "new-Pa55word-b2c", old_hash,
                            new_hash, broken)


def test_client_certificates_required(tmp_path, certs):
    strangers = make_certificates(tmp_path)  # another CA
    path = write_web_config(tmp_path, tls_server_config={
        "cert_file": str(certs.server_cert), "key_file": str(certs.server_key),
        "client_ca_file": str(certs.ca), "client_auth_type": "RequireAndVerifyClientCert"})
    with CollectorProcess("--web-config-file", path) as collector:
        with pytest.raises(CONNECTION_FAILED):
            collector.scrape(context=client_context(certs.ca))
        tls12 = client_context(certs.ca)  # where the handshake itself carries the refusal
        tls12.maximum_version = ssl.TLSVersion.TLSv1_2
        with pytest.raises(urllib.error.URLError) as error:
            collector.scrape(context=tls12)
        assert isinstance(error.value.reason, ssl.SSLError), error.value
        with pytest.raises(CONNECTION_FAILED):
            collector.scrape(context=client_context(certs.ca, client=strangers))
        assert "gradwatch_collector_sessions" in collector.scrape(
            context=client_context(certs.ca, client=certs))


@pytest.mark.parametrize("settings, message", [
    ({"basic_auth_users": {"prometheus": "$2y$10$x"}, "tls_config": {}},
     "tls_config: unknown or unsupported setting"),
    ({"tls_server_config": {"cert_file": "missing.pem", "key_file": "missing-key.pem"}},
     "tls_server_config.cert_file: cannot read"),
])
def test_an_invalid_file_stops_the_collector_at_start(tmp_path, settings, message):
    path = write_web_config(tmp_path, **settings)
    result = subprocess.run(
        [sys.executable, "-m", "gradwatch", "collector", "--grpc-address", "127.0.0.1:0",
         "--metrics-address", "127.0.0.1:0", "--web-config-file", path],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"web_config_file (from --web-config-file): {path}: {message}" in result.stderr
