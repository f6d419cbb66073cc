"""What a compromised agent can write, and what the operator's terminal then shows.

An agent's ACL user may write any field of the status hash and any heartbeat
key (docs/reliability.md): these tests write hostile records as that user and
run ``hotswap status`` (and ``log``/``show`` for strings a publisher or a
checkpoint brings) as the publisher user.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import redis
import torch
from rel_support import MODEL, acl_url, apply_acl, make_state, settings_for

from hotswap import keys
from hotswap import status as st
from hotswap.embedded import EmbeddedRedis
from publisher import cli
from publisher.publisher import Publisher

pytestmark = pytest.mark.reliability
NS = "hotswap"


@pytest.fixture
def fleet() -> Iterator[tuple[EmbeddedRedis, redis.Redis]]:
    """A server with the documented users, v1 published, and an agent user's client."""
    with EmbeddedRedis() as server:
        admin = redis.Redis.from_url(server.url, socket_timeout=5)
        apply_acl(admin)
        with Publisher(MODEL, settings=settings_for(acl_url(server, "hotswap-publisher"))) as p:
            p.publish(make_state(1), message="first")
            p.publish(make_state(2), message="second")
        agent = redis.Redis.from_url(acl_url(server, "hotswap-agent"), socket_timeout=5)
        yield server, agent
        agent.close()
        admin.close()


def report(agent: redis.Redis, agent_id: str, record: bytes | st.AgentStatus) -> None:
    """Write a status record and a live heartbeat, as the agent user."""
    data = st.encode(record) if isinstance(record, st.AgentStatus) else record
    agent.hset(keys.agents_key(NS, MODEL), agent_id, data)
    agent.set(keys.heartbeat_key(NS, MODEL, agent_id), b"1", px=60_000)


def run_cli(
    server: EmbeddedRedis, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str]:
    code = cli.main(["--redis-url", acl_url(server, "hotswap-publisher"), *argv])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_garbled_records_are_listed_as_unreadable_and_pin_nothing(
    fleet: tuple[EmbeddedRedis, redis.Redis], capsys: pytest.CaptureFixture[str]
) -> None:
    server, agent = fleet
    report(agent, "garbage", b"\xc1\xc1 not msgpack")
    report(agent, "honest", st.AgentStatus("honest", "host-1", 11, state="idle", version=2))
    code, text = run_cli(server, capsys, "status", MODEL)
    assert code == 0
    rows = {line.split()[1]: line for line in text.splitlines() if line.startswith("│")}
    assert "unreadable" in rows["garbage"] and "v2" in rows["honest"]
    cfg = settings_for(acl_url(server, "hotswap-publisher"))
    with Publisher(MODEL, settings=cfg) as pub:
        assert pub.running_versions() == [2]  # the garbled record pins nothing


def test_a_forged_record_can_pin_a_version_from_gc(
    fleet: tuple[EmbeddedRedis, redis.Redis],
) -> None:
    """A documented limit: records are trusted for retention, so a compromised agent
    that claims to run v1 keeps gc from deleting it (it cannot change any weights)."""
    server, agent = fleet
    report(agent, "liar", st.AgentStatus("liar", "h", 1, state="idle", version=1))
    with Publisher(MODEL, settings=settings_for(acl_url(server, "hotswap-publisher"))) as pub:
        kept = pub.gc(keep=1)
    assert kept.kept == [1, 2] and kept.deleted_versions == []


def test_markup_in_an_agents_state_is_shown_literally(
    fleet: tuple[EmbeddedRedis, redis.Redis], capsys: pytest.CaptureFixture[str]
) -> None:
    server, agent = fleet
    report(agent, "a-close", st.AgentStatus("a-close", "h", 1, state="[/]"))
    report(
        agent, "b-link", st.AgentStatus("b-link", "h", 2, state="[link=http://x.example]ok[/link]")
    )
    code, text = run_cli(server, capsys, "status", MODEL)
    assert code == 0, text
    assert "[/]" in text and "[link=http://x.example]ok[/link]" in text


@pytest.mark.parametrize("command", ["status", "log", "show"])
def test_terminal_escapes_from_redis_are_not_printed(
    fleet: tuple[EmbeddedRedis, redis.Redis], capsys: pytest.CaptureFixture[str], command: str
) -> None:
    server, agent = fleet
    esc = "\x1b[2J\x1b]0;pwned\x07"
    report(
        agent,
        "esc",
        st.AgentStatus("esc", f"host{esc}", 1, state="idle", last_error=esc, rejected_version=2),
    )
    state = {f"layer{esc}": torch.ones(3)}
    with Publisher(MODEL, settings=settings_for(acl_url(server, "hotswap-publisher"))) as pub:
        pub.publish(state, message=f"third {esc}")
    code, text = run_cli(server, capsys, command, MODEL)
    assert code == 0
    assert "\x1b" not in text and "\x07" not in text
    # Shown as escapes, so the operator sees that something odd is there.
    assert r"\x1b[2J\x1b]0;pwned\x07" in text
    # --json carries the exact strings (JSON escapes them).
    code, out = run_cli(server, capsys, command, MODEL, "--json")
    assert code == 0 and "\x1b" not in out
    data = json.loads(out)
    found = {
        "status": lambda: {a["host"] for a in data["agents"]},
        "log": lambda: {row.get("message") for row in data},
        "show": lambda: {t["name"] for t in data["tensors"]} | {data["message"]},
    }[command]()
    assert {f"host{esc}", f"third {esc}", f"layer{esc}"} & found


def test_bidi_and_c1_controls_from_redis_are_shown_as_escapes(
    fleet: tuple[EmbeddedRedis, redis.Redis], capsys: pytest.CaptureFixture[str]
) -> None:
    """An RLO reorders what follows it; 0x9b is a one-byte CSI on some terminals."""
    server, agent = fleet
    odd = "ok\u202eevil\u2066\x9b2J\x7f\n[bold]x"
    report(agent, "odd", st.AgentStatus("odd", odd, 1, state=odd, last_error=odd))
    code, text = run_cli(server, capsys, "status", MODEL)
    assert code == 0, text
    for c in "\u202e\u2066\x9b\x7f":
        assert c not in text
    assert text.count(r"ok\u202eevil\u2066\x9b2J\x7f\n[bold]x") == 2  # host and state


def test_a_garbled_log_entry_is_shown_not_fatal(
    fleet: tuple[EmbeddedRedis, redis.Redis], capsys: pytest.CaptureFixture[str]
) -> None:
    """Numbers that are not numbers, a time past year 9999, emoji codes and markup."""
    server, _ = fleet
    admin = redis.Redis.from_url(server.url, socket_timeout=5)
    fields = {
        "version": "9",
        "kind": "publish",
        "created": "1e300",
        "bytes_uploaded": "lots",
        "bytes_total": "nan",
        "author": ":smile: [b]x[/b]",
        "message": "[link=http://x.example]m[/link]",
    }
    admin.xadd(keys.log_key(NS, MODEL), fields)  # type: ignore[arg-type]
    admin.close()
    code, text = run_cli(server, capsys, "log", MODEL)
    assert code == 0, text
    row = next(line for line in text.splitlines() if "v9" in line)
    assert "1e+300" in row and ":smile: [b]x[/b]" in row
    assert "[link=http://x.example]m[/link]" in row
