"""The web-config file (Prometheus' format): parsing, errors that name the field and never a
secret, the TLS context, basic-auth checks, reloading, and the collector settings."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import ssl

import bcrypt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gradwatch.collector import config, web_config
from tests.support.certificates import make_certificates


def hashed(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("certs"))


def write(folder, data, name: str = "web.yml"):
    """Writes ``data`` (JSON is YAML) atomically, as Kubernetes and editors do."""
    path = folder / name
    tmp = folder / f".{name}.tmp"
    tmp.write_text(data if isinstance(data, str) else json.dumps(data))
    os.replace(tmp, path)
    return path


def tls_block(certs, **extra):
    return {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key), **extra}


def test_full_file_with_relative_paths(tmp_path, certs):
    for cert in ("ca", "server_cert", "server_key"):
        (tmp_path / getattr(certs, cert).name).write_bytes(getattr(certs, cert).read_bytes())
    path = write(tmp_path, f"""
tls_server_config:
  cert_file: server.pem
  key_file: server-key.pem
  client_ca_file: ca.pem
  client_auth_type: RequireAndVerifyClientCert
  min_version: TLS13
basic_auth_users:
  prometheus: {hashed("secret")}
""")
    loaded = web_config.load(path)
    assert loaded.tls.cert_file == tmp_path / "server.pem"
    assert loaded.tls.client_ca_file == tmp_path / "ca.pem"
    assert loaded.tls.client_auth_type == "RequireAndVerifyClientCert"
    assert list(loaded.users) == ["prometheus"]
    assert "$2b$" not in repr(loaded)
    context = web_config.server_context(loaded.tls)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.minimum_version == ssl.TLSVersion.TLSv1_3


@pytest.mark.parametrize("text", ["", "tls_server_config:\nbasic_auth_users:\n"])
def test_empty_file_means_plain_http_without_auth(tmp_path, text):
    loaded = web_config.load(write(tmp_path, text))
    assert loaded.tls is None and not loaded.users


def test_defaults_and_optional_client_certificates(tmp_path, certs):
    loaded = web_config.load(write(tmp_path, {"tls_server_config": tls_block(certs)}))
    assert (loaded.tls.client_auth_type, loaded.tls.min_version) == ("NoClientCert", "TLS12")
    context = web_config.server_context(loaded.tls)
    assert context.verify_mode == ssl.CERT_NONE
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    optional = web_config.load(write(tmp_path, {"tls_server_config": tls_block(
        certs, client_ca_file=str(certs.ca), client_auth_type="VerifyClientCertIfGiven")}))
    assert web_config.server_context(optional.tls).verify_mode == ssl.CERT_OPTIONAL


@pytest.mark.parametrize("data, message", [
    ({"tls_config": {}}, "tls_config: unknown or unsupported setting"),
    ({"http_server_config": {"http2": False}}, "http_server_config: unknown or unsupported"),
    ({"tls_server_config": "yes"}, "tls_server_config: expected a mapping"),
    ({"tls_server_config": {"cipher_suites": ["TLS_AES_128_GCM_SHA256"]}},
     "tls_server_config.cipher_suites: unknown or unsupported setting"),
    ({"tls_server_config": {"cert_file": "server.pem"}},
     "tls_server_config.key_file: missing"),
    ({"tls_server_config": {"cert_file": "nowhere.pem", "key_file": "server-key.pem"}},
     "tls_server_config.cert_file: cannot read .*nowhere.pem: No such file"),
    ({"tls_server_config": {"cert_file": 3, "key_file": "k"}},
     "tls_server_config.cert_file: expected a non-empty string"),
    ({"tls_server_config": {"cert_file": "a", "key_file": "b",
                            "client_auth_type": "RequireAnyClientCert"}},
     "tls_server_config.client_auth_type: 'RequireAnyClientCert' is not supported"),
    ({"tls_server_config": {"cert_file": "a", "key_file": "b", "min_version": "TLS11"}},
     "tls_server_config.min_version: 'TLS11' is not supported"),
    ({"tls_server_config": {"cert_file": "a", "key_file": "b", "client_ca_file": "ca.pem"}},
     "tls_server_config.client_ca_file: set without a client_auth_type"),
    ({"tls_server_config": {"cert_file": "a", "key_file": "b",
                            "client_auth_type": "RequireAndVerifyClientCert"}},
     "tls_server_config.client_ca_file: required with client_auth_type"),
    ({"basic_auth_users": ["prometheus"]}, "basic_auth_users: expected a mapping"),
    ({"basic_auth_users": {"a:b": "x"}}, "basic_auth_users: user name 'a:b'"),
    ({"basic_auth_users": {"prometheus": "plain-text-secret"}},
     r"basic_auth_users.prometheus: expected a bcrypt hash"),
    ("basic_auth_users: [unclosed", "invalid YAML at line 1"),
    ("- a list", "expected a mapping at the top level"),
])
def test_invalid_files_name_the_field(tmp_path, data, message):
    with pytest.raises(web_config.WebConfigError, match=message) as error:
        web_config.load(write(tmp_path, data))
    assert "plain-text-secret" not in str(error.value)


def test_files_that_do_not_load_are_named(tmp_path, certs):
    other = make_certificates(tmp_path)
    mismatched = tls_block(certs, key_file=str(other.server_key))
    with pytest.raises(web_config.WebConfigError, match="cert_file, key_file: cannot load"):
        web_config.load(write(tmp_path, {"tls_server_config": mismatched}))
    not_a_ca = tls_block(certs, client_ca_file=str(certs.server_key),
                         client_auth_type="RequireAndVerifyClientCert")
    with pytest.raises(web_config.WebConfigError, match="client_ca_file: cannot load"):
        web_config.load(write(tmp_path, {"tls_server_config": not_a_ca}))
    with pytest.raises(web_config.WebConfigError, match="cannot read the file"):
        web_config.load(tmp_path / "missing.yml")


def test_a_yaml_error_never_quotes_the_line(tmp_path):
    secret = hashed("secret")
    with pytest.raises(web_config.WebConfigError) as error:
        web_config.load(write(tmp_path, f"basic_auth_users:\n  prometheus: {secret}: [\n"))
    assert secret not in str(error.value) and "line 2" in str(error.value)


@pytest.mark.parametrize("header, expected", [
    ("Basic " + base64.b64encode(b"user:pa:ss").decode(), (b"user", b"pa:ss")),
    ("basic " + base64.b64encode(b"user:").decode(), (b"user", b"")),
    ("Basic " + base64.b64encode(b"no-colon").decode(), None),
    ("Basic not base64!", None),
    ("Basic \u00e9t\u00e9", None),
    ("Bearer abc", None),
    ("", None),
])
def test_basic_credentials(header, expected):
    assert web_config.basic_credentials(header) == expected


def test_passwords_are_checked_once_then_remembered(monkeypatch):
    calls = []
    real = web_config._checkpw

    def counting(password, hashed_password):
        calls.append(password)
        return real(password, hashed_password)

    monkeypatch.setattr(web_config, "_checkpw", counting)
    passwords = web_config.Passwords({"prometheus": hashed("secret").encode(),
                                      "other": hashed("other").encode()})

    async def run():
        return [await passwords.check(b"prometheus", b"secret"),
                await passwords.check(b"prometheus", b"secret"),
                await passwords.check(b"prometheus", b"wrong"),
                await passwords.check(b"nobody", b"secret"),
                await passwords.check(b"prometheus", b"x" * 100),
                await passwords.check(b"other", b"secret")]

    assert asyncio.run(run()) == [True, True, False, False, False, False]
    # the second correct check was remembered; an unknown user still costs one bcrypt check
    assert calls == [b"secret", b"wrong", b"secret", b"x" * 100, b"secret"]


def test_middleware_answers_401_with_the_realm(tmp_path):
    path = write(tmp_path, {"basic_auth_users": {"prometheus": hashed("secret")}})

    async def run():
        security = web_config.WebSecurity(path)
        app = web.Application(middlewares=[security.middleware])
        app.router.add_get("/metrics", lambda request: web.Response(text="metrics"))
        async with TestClient(TestServer(app)) as client:
            anonymous = await client.get("/metrics")
            wrong = await client.get("/metrics", headers={"Authorization": "Basic " +
                                     base64.b64encode(b"prometheus:wrong").decode()})
            right = await client.get("/metrics", headers={"Authorization": "Basic " +
                                     base64.b64encode(b"prometheus:secret").decode()})
            return [(r.status, r.headers.get("WWW-Authenticate"), await r.text())
                    for r in (anonymous, wrong, right)]

    anonymous, wrong, right = asyncio.run(run())
    assert anonymous == wrong == (401, 'Basic realm="gradwatch"', "Unauthorized\n")
    assert right == (200, None, "metrics")


def test_reload_applies_users_and_keeps_them_when_the_file_breaks(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=web_config.__name__)
    path = write(tmp_path, {"basic_auth_users": {"old": hashed("old")}})
    security = web_config.WebSecurity(path)
    assert not security.reload_if_changed()  # unchanged
    write(tmp_path, {"basic_auth_users": {"new": hashed("new")}})
    assert security.reload_if_changed()
    assert asyncio.run(security.passwords.check(b"new", b"new"))
    assert not asyncio.run(security.passwords.check(b"old", b"old"))
    broken = hashed("new")[:-1]
    write(tmp_path, {"basic_auth_users": {"new": broken}})
    assert not security.reload_if_changed()
    assert asyncio.run(security.passwords.check(b"new", b"new"))
    assert "basic_auth_users.new: expected a bcrypt hash" in caplog.text
    assert "keeping the previous settings" in caplog.text
    assert broken not in caplog.text
    assert not security.reload_if_changed()  # logged once per change


def test_reload_refuses_what_needs_a_restart(tmp_path, certs, caplog):
    path = write(tmp_path, {"tls_server_config": tls_block(certs)})
    security = web_config.WebSecurity(path)
    context = security.ssl_context
    write(tmp_path, {"tls_server_config": tls_block(
        certs, client_ca_file=str(certs.ca), client_auth_type="RequireAndVerifyClientCert",
        min_version="TLS13")})
    assert security.reload_if_changed()
    assert "changing tls_server_config client_ca_file, client_auth_type, min_version needs " \
           "a restart" in caplog.text
    assert security.ssl_context is context and context.verify_mode == ssl.CERT_NONE
    write(tmp_path, {})
    assert security.reload_if_changed()
    assert "turning TLS on or off needs a restart; still serving https" in caplog.text


def test_reload_sees_a_changed_certificate_file(tmp_path, certs):
    live = tmp_path / "live"
    live.mkdir()
    for source, name in ((certs.server_cert, "server.pem"), (certs.server_key, "key.pem")):
        (live / name).write_bytes(source.read_bytes())
    security = web_config.WebSecurity(write(live, {"tls_server_config": {
        "cert_file": "server.pem", "key_file": "key.pem"}}))
    other = make_certificates(tmp_path)
    write(live, other.server_cert.read_text(), "server.pem")
    write(live, other.server_key.read_text(), "key.pem")
    assert security.reload_if_changed()  # the handshakes themselves: test_metrics_auth.py


# -- collector settings --------------------------------------------------------------------

def parse(*argv: str) -> config.CollectorConfig:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return config.load(parser.parse_args(list(argv)))


def test_flag_environment_and_collector_file(tmp_path, monkeypatch):
    monkeypatch.delenv("GRADWATCH_WEB_CONFIG_FILE", raising=False)
    (tmp_path / "conf").mkdir()
    web = write(tmp_path / "conf", {})
    collector_file = write(tmp_path / "conf", {"web_config_file": "web.yml"}, "collector.yaml")
    assert parse().web_config_file is None
    # relative to the collector file's folder, as in Prometheus
    assert parse("--config", str(collector_file)).web_config_file == str(web)
    other = write(tmp_path, {}, "other.yml")
    monkeypatch.setenv("GRADWATCH_WEB_CONFIG_FILE", str(other))
    assert parse("--config", str(collector_file)).web_config_file == str(other)
    assert parse("--web-config-file", str(web)).web_config_file == str(web)


def test_an_invalid_web_config_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv("GRADWATCH_WEB_CONFIG_FILE", raising=False)
    path = write(tmp_path, {"tls_server_config": {"cert_file": "gone.pem", "key_file": "k"}})
    with pytest.raises(config.ConfigError, match=f"web_config_file \\(from --web-config-file\\): "
                       f"{path}: tls_server_config.cert_file: cannot read"):
        parse("--web-config-file", str(path))
    with pytest.raises(config.ConfigError, match=r"web_config_file = 1 .*expected a non-empty"):
        parse("--config", str(write(tmp_path, {"web_config_file": 1}, "collector.yaml")))
