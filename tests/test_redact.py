"""One redaction for every URL shown (issue 13, defect 11): pure cases."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import torch
from safetensors.torch import save_file

from hotswap import connection
from hotswap.embedded import EmbeddedRedis
from hotswap.redact import redact, scrub, secrets
from publisher import cli

SECRET = "Sup3rS3cret"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        (f"redis://:{SECRET}@h:6379/0", "redis://:***@h:6379/0"),
        (f"redis://app:{SECRET}@h:6379/0", "redis://app:***@h:6379/0"),
        (
            f"rediss://app:{SECRET}@h/0?ssl_cert_reqs=none",
            "rediss://app:***@h/0?ssl_cert_reqs=none",
        ),
        (f"redis://h:6379/0?password={SECRET}", "redis://h:6379/0?password=***"),
        (f"redis://h/0?db=1&password={SECRET}&x=2", "redis://h/0?db=1&password=***&x=2"),
        (f"unix:///run/r.sock?password={SECRET}", "unix:///run/r.sock?password=***"),
        (f"redis://h/0?PassWord={SECRET}", "redis://h/0?PassWord=***"),
        (f"redis://h/0?auth_token={SECRET}", "redis://h/0?auth_token=***"),
        # Unencoded '@', '?' and '/' in the password: hidden however a parser splits it.
        ("redis://u:pa@ss@h:1/0", "redis://u:***@h:1/0"),
        ("redis://u:pa?ssword@h:1/0", "redis://u:***@h:1/0"),
        ("redis://h/0?password=a@bcde", "redis://h/0?password=***"),
        # Percent-encoded: both forms are masked.
        ("redis://u:p%40ssw0rd@h/0", "redis://u:***@h/0"),
        ("no scheme:pw@host", "no scheme:***@host"),
        ("redis://justuser@h/0", "redis://justuser@h/0"),  # a user name alone is not secret
    ],
)
def test_redact_hides_every_password_form(url: str, shown: str) -> None:
    assert redact(url) == shown
    assert connection.redact(url) == shown  # the name connection always had


def test_secrets_lists_raw_and_decoded_forms() -> None:
    assert secrets("redis://u:p%40ssw0rd@h/0") == {"p%40ssw0rd", "p@ssw0rd"}
    assert secrets("redis://h/0") == set()
    assert secrets("redis://:@h/0?password=") == set()


def test_scrub_masks_pieces_a_parser_may_quote() -> None:
    url = f"redis://u:{SECRET}/extra@h:6379/0"
    # urllib cuts the host at '/', and reads the password as a port.
    message = f"Port could not be cast to integer value as '{SECRET}'"
    assert scrub(message, url) == "Port could not be cast to integer value as '***'"
    assert scrub(f"at {url}: no", None, url) == "at redis://u:***@h:6379/0: no"
    assert scrub("nothing secret", None) == "nothing secret"


# -- every command and the demo, with a password in the URL ---------------------------


@pytest.fixture(scope="module")
def locked() -> Iterator[EmbeddedRedis]:
    """A private server that requires SECRET (set once it runs: start() pings unauthenticated)."""
    with EmbeddedRedis() as server:
        admin = redis.Redis.from_url(server.url)
        admin.config_set("requirepass", SECRET)
        admin.close()
        yield server


def forms(server: EmbeddedRedis) -> dict[str, str]:
    where = f"127.0.0.1:{server.port}"
    return {
        "userinfo": f"redis://:{SECRET}@{where}/0",
        "query": f"redis://{where}/0?password={SECRET}",
    }


def checkpoint(tmp_path: Path, name: str, scale: float) -> str:
    path = tmp_path / name
    save_file({"w": torch.ones(4, 4) * scale, "b": torch.zeros(4)}, str(path))
    return str(path)


class Run:
    """``hotswap`` in-process with everything it prints and logs collected."""

    def __init__(
        self, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
    ) -> None:
        self.capsys, self.caplog = capsys, caplog
        self.seen: list[str] = []

    def __call__(self, *argv: str) -> tuple[int, str]:
        code = cli.main(list(argv))
        out = self.capsys.readouterr()
        text = out.out + out.err + "\n".join(r.getMessage() for r in self.caplog.records)
        self.caplog.clear()
        self.seen.append(text)
        return code, text


def assert_no_secret(texts: list[str], *secrets_: str) -> None:
    for text in texts:
        for secret in secrets_:
            assert secret not in text, text


@pytest.mark.parametrize("form", ["userinfo", "query"])
@pytest.mark.parametrize("given", ["option", "environment"])
def test_no_command_prints_the_password(
    locked: EmbeddedRedis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    form: str,
    given: str,
) -> None:
    """Issue 13, defect 11: every command, in success and in failure, `--json` and
    `--debug` too; the URL given with --redis-url or HOTSWAP_REDIS_URL."""
    caplog.set_level(logging.DEBUG)
    for name in list(os.environ):
        if name.startswith("HOTSWAP_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no .env
    url = forms(locked)[form]
    run = Run(capsys, caplog)
    ns = f"ns-{form}-{given}"
    if given == "option":
        shared = ["--redis-url", url, "--namespace", ns]
    else:
        monkeypatch.setenv("HOTSWAP_REDIS_URL", url)
        shared = ["--namespace", ns]
    one, two = (
        checkpoint(tmp_path, "one.safetensors", 1.0),
        checkpoint(tmp_path, "two.safetensors", 1.5),
    )
    for argv, expected in (
        (["publish", "m", one], 0),
        (["publish", "m", two, "-m", "second"], 0),
        (["status", "m"], 0),
        (["status", "m", "--json"], 0),
        (["log", "m"], 0),
        (["show", "m"], 0),
        (["show", "m", "1", "--json"], 0),
        (["diff", "m", "1", "2"], 0),
        (["rollback", "m"], 0),
        (["gc", "m", "--keep", "1", "--dry-run"], 0),
        (["gc", "m", "--keep", "1"], 0),
        (["verify", "m"], 0),
        (["show", "m", "99"], 1),  # an error line
        (["show", "m", "99", "--debug"], 1),  # and its traceback
        (["show", "absent", "--json"], 1),
    ):
        code, text = run(*shared, *argv)
        assert code == expected, text
    assert any("published v2" in text for text in run.seen)
    assert_no_secret(run.seen, SECRET)


BROKEN = {
    # Wrong password: refused by the server.
    "wrong password": "redis://:Wr0ngPassw0rd@127.0.0.1:{port}/0",
    "wrong password, query": "redis://127.0.0.1:{port}/0?password=Wr0ngPassw0rd",
    # Rejected by redis-py's parser: the message names the URL.
    "bad option": "redis://127.0.0.1:{port}/0?password=Wr0ngPassw0rd&socket_timeout=abc",
    "bad port": "redis://:Wr0ngPassw0rd@127.0.0.1:notaport/0",
    "slash in password": "redis://u:Wr0ngPassw0rd/x@127.0.0.1:{port}/0",
    "bad scheme": "http://:Wr0ngPassw0rd@127.0.0.1:{port}/0",
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_no_error_prints_the_password(
    locked: EmbeddedRedis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    case: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.chdir(tmp_path)
    url = BROKEN[case].format(port=locked.port)
    run = Run(capsys, caplog)
    for argv in (["status", "m"], ["verify", "m"], ["status", "m", "--debug"]):
        code, text = run("--redis-url", url, *argv)
        assert code != 0 and "hotswap: error:" in text, text
    monkeypatch.setenv("HOTSWAP_REDIS_URL", url)
    code, text = run("log", "m", "--debug")
    assert code != 0
    assert_no_secret(run.seen, "Wr0ngPassw0rd")
    if case in ("bad option", "bad port", "bad scheme"):
        assert any("HOTSWAP_REDIS_URL" in text and "***" in text for text in run.seen)


@pytest.mark.parametrize("form", ["userinfo", "query"])
def test_the_demo_never_prints_the_password(
    locked: EmbeddedRedis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    form: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in list(os.environ):
        if name.startswith("HOTSWAP_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    url = forms(locked)[form]
    monkeypatch.setenv("HOTSWAP_REDIS_URL", url)
    run = Run(capsys, caplog)
    code, text = run("demo")
    assert code == 0, text
    assert f"hotswap demo on {redact(url)} under the namespace" in text
    assert_no_secret(run.seen, SECRET)
