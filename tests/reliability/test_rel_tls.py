"""TLS: a throwaway CA, a redis-server that requires client certificates, rediss:// URLs.

Skipped (with the reason) where the openssl command or a TLS-capable
redis-server is missing.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from rel_support import MODEL, admin_store, assert_runs_exactly, live_copy, make_state, settings_for

from hotswap.agent import Agent
from hotswap.embedded import EmbeddedRedis, free_port
from hotswap.errors import HotswapError, StoreUnavailable
from publisher.publisher import Publisher

pytestmark = pytest.mark.reliability


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    stranger_ca: Path


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def make_pki(folder: Path) -> Pki:
    """A CA, a server cert for 127.0.0.1, a client cert, and an unrelated CA."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for name in ("ca", "stranger"):
        key, crt, subject = folder / f"{name}.key", folder / f"{name}.crt", f"/CN=test {name}"
        openssl("req", "-x509", *ec, "-keyout", key, "-out", crt, "-days", "1", "-subj", subject)
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        openssl("req", *ec, "-keyout", folder / f"{name}.key", "-out", folder / f"{name}.csr",
                "-subj", f"/CN=hotswap test {name}")  # fmt: skip
        openssl("x509", "-req", "-in", folder / f"{name}.csr", "-CA", folder / "ca.crt",
                "-CAkey", folder / "ca.key", "-CAcreateserial", "-days", "1",
                "-out", folder / f"{name}.crt", "-extfile", folder / "san.ext")  # fmt: skip
    return Pki(
        folder / "ca.crt",
        folder / "server.crt",
        folder / "server.key",
        folder / "client.crt",
        folder / "client.key",
        folder / "stranger.crt",
    )


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbeddedRedis, int, Pki]]:
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a throwaway CA")
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    tls_port = free_port()
    args = [
        "--tls-port", str(tls_port),
        "--tls-cert-file", str(pki.server_cert),
        "--tls-key-file", str(pki.server_key),
        "--tls-ca-cert-file", str(pki.ca),
        "--tls-auth-clients", "yes",
    ]  # fmt: skip
    server = EmbeddedRedis(extra_args=args)
    try:
        server.start()
    except HotswapError as e:
        pytest.skip(f"this redis-server cannot serve TLS: {e}")
    yield server, tls_port, pki
    server.stop()


def test_publish_and_apply_over_mutual_tls(tls_redis: tuple[EmbeddedRedis, int, Pki]) -> None:
    server, port, pki = tls_redis
    cfg = settings_for(
        f"rediss://127.0.0.1:{port}/0",
        tls_ca_file=str(pki.ca),
        tls_cert_file=str(pki.client_cert),
        tls_key_file=str(pki.client_key),
        chunk_bytes=4096,  # several chunks per tensor: the blob transport over TLS
    )
    state = make_state(7, tensors=4, width=48)
    live = live_copy(make_state(6, tensors=4, width=48))
    with Publisher(MODEL, settings=cfg) as pub, Agent(live, MODEL, settings=cfg) as agent:
        v1 = pub.publish(state, message="over TLS")
        assert pub.last_report.bytes_uploaded == sum(t.nbytes for t in state.values())
        assert agent.wait_for(v1, 10)
        assert pub.verify(v1).ok
        assert pub.store.manifest(v1).message == "over TLS"
    store = admin_store(server)  # the plain port, to look
    assert_runs_exactly(store, live, v1)


@pytest.mark.parametrize(
    ("how", "problem"),
    [
        ("stranger CA", "certificate verify failed"),
        ("no client certificate", "ConnectionError"),
        ("plain redis://", "ConnectionError"),
    ],
)
def test_untrusted_or_plain_connections_are_refused(
    tls_redis: tuple[EmbeddedRedis, int, Pki], how: str, problem: str
) -> None:
    _server, port, pki = tls_redis
    fields: dict[str, object] = {"tls_ca_file": str(pki.ca)}
    scheme = "rediss"
    if how == "stranger CA":
        fields.update(
            tls_ca_file=str(pki.stranger_ca),
            tls_cert_file=str(pki.client_cert),
            tls_key_file=str(pki.client_key),
        )
    elif how == "plain redis://":
        scheme = "redis"
    cfg = settings_for(f"{scheme}://127.0.0.1:{port}/0", retry_attempts=1, **fields)
    with Publisher(MODEL, settings=cfg) as pub, pytest.raises(StoreUnavailable) as caught:
        pub.publish(make_state(1, tensors=1, width=4))
    text = str(caught.value)
    assert text.startswith(f"Redis unreachable while reading head for model {MODEL!r}")
    assert problem in text and "\n" not in text
