"""What a compromised agent can write, and what the operator's terminal then shows.

Under the documented ACL an agent's user writes only its own status record and
heartbeat (``NS:{MODEL}:status:ID``, ``NS:{MODEL}:agent:ID``); a shared agent
user, or the hash of agent records older agents wrote, lets one agent write
any. These tests write hostile records as the admin (standing for whichever
user could) and run ``hotswap status`` (and ``log``/``show`` for strings a
publisher or a checkpoint brings) as the publisher user.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest
import redis
import torch
from acl_support import PUBLISHER, apply_documented, user_url
from rel_support import MODEL, make_state, settings_for

from hotswap import keys
from hotswap import status as st
from hotswap.embedded import EmbeddedRedis
from publisher import cli
from publisher.publisher import Publisher

pytestmark = pytest.mark.reliability
NS = "hotswap"


def acl_url(server: EmbeddedRedis, user: str) -> str:
    return user_url(server, user)


@pytest.fixture
def fleet() -> Iterator[tuple[EmbeddedRedis, redis.Redis]]:
    """A server with the documented users, v1 and v2 published, and an admin client."""
    with EmbeddedRedis() as server:
        admin = apply_documented(server)
        with Publisher(MODEL, settings=settings_for(acl_url(server, PUBLISHER))) as p:
            p.publish(make_state(1), message="first")
            p.publish(make_state(2), message="second")
        yield server, admin
        admin.close()


def report(client: redis.Redis, agent_id: str, record: bytes | st.AgentStatus) -> None:
    """Write a status record and a live heartbeat where an agent of this version does."""
    data = st.encode(record) if isinstance(record, st.AgentStatus) else record
    client.set(keys.agent_status_key(NS, MODEL, agent_id), data, px=60_000)
    client.set(keys.heartbeat_key(NS, MODEL, agent_id), b"1", px=60_000)


def rows_of(text: str) -> dict[str, str]:
    """``hotswap status`` table rows by agent id."""
    return {line.split()[1]: line for line in text.splitlines() if line.startswith("│")}


def run_cli(
    server: EmbeddedRedis, capsys: pytest.CaptureFixture[str], *argv: str
) -> tuple[int, str]:
    code = cli.main(["--redis-url", acl_url(server, PUBLISHER), *argv])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_garbled_records_are_listed_as_unreadable(
    fleet: tuple[EmbeddedRedis, redis.Redis], capsys: pytest.CaptureFixture[str]
) -> None:
    server, admin = fleet
    report(admin, "garbage", b"\xc1\xc1 not msgpack")
    report(admin, "honest", st.AgentStatus("honest", "host-1", 11, state="idle", version=2))
    code, text = run_cli(server, capsys, "status", MODEL)
    assert code == 0
    rows = rows_of(text)
    assert "unreadable" in rows["garbage"] and "v2" in rows["honest"]
    cfg = settings_for(acl_url(server, PUBLISHER))
    with Publisher(MODEL, settings=cfg) as pub:
        assert pub.running_versions() == [2]  # what can be read; gc keeps every version


def test_a_forged_record_can_pin_a_version_from_gc(
    fleet: tuple[EmbeddedRedis, redis.Redis],
) -> None:
    """A documented limit: records are trusted for retention, so a compromised agent
    that claims to run v1 keeps gc from deleting it (it cannot change any weights)."""
    server, admin = fleet
    report(admin, "liar", st.AgentStatus("liar", "h", 1, state="idle", version=1))
    with Publisher(MODEL, settings=settings_for(acl_url(server, PUBLISHER))) as pub:
        kept = pub.gc(keep=1)
    assert kept.kept == [1, 2] and kept.deleted_versions == []


def test_markup_in_an_agents_state_is_shown_literally(
    fleet: tuple[EmbeddedRedis, redis.Redis], capsys: pytest.CaptureFixture[str]
) -> None:
    server, admin = fleet
    report(admin, "a-close", st.AgentStatus("a-close", "h", 1, state="[/]"))
    report(
        admin, "b-link", st.AgentStatus("b-link", "h", 2, state="[link=http://x.example]ok[/link]")
    )
    code, text = run_cli(server, capsys, "status", MODEL)
    assert code == 0, text
    assert "[/]" in text and "[link=http://x.example]ok[/link]" in text


@pytest.mark.parametrize("command", ["status", "log", "show"])
def test_terminal_escapes_from_redis_are_not_printed(
    fleet: tuple[EmbeddedRedis, redis.Redis], capsys: pytest.CaptureFixture[str], command: str
) -> None:
    server, admin = fleet
    esc = "\x1b[2J\x1b]0;pwned\x07"
    report(
        admin,
        "esc",
        st.AgentStatus("esc", f"host{esc}", 1, state="idle", last_error=esc, rejected_version=2),
    )
    state = {f"layer{esc}": torch.ones(3)}
    with Publisher(MODEL, settings=settings_for(acl_url(server, PUBLISHER))) as pub:
        # A name head lacks: forced past the publisher's own check.
        pub.publish(state, message=f"third {esc}", exclude=["layer0*"], force=True)
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
    server, admin = fleet
    odd = "ok\u202eevil\u2066\x9b2J\x7f\n[bold]x"
    report(admin, "odd", st.AgentStatus("odd", odd, 1, state=odd, last_error=odd))
    code, text = run_cli(server, capsys, "status", MODEL)
    assert code == 0, text
    for c in "\u202e\u2066\x9b\x7f":
        assert c not in text
    assert text.count(r"ok\u202eevil\u2066\x9b2J\x7f\n[bold]x") == 2  # host and state


def test_a_garbled_log_entry_is_shown_not_fatal(
    fleet: tuple[EmbeddedRedis, redis.Redis], capsys: pytest.CaptureFixture[str]
) -> None:
    """Numbers that are not numbers, a time past year 9999, emoji codes and markup."""
    server, admin = fleet
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
    code, text = run_cli(server, capsys, "log", MODEL)
    assert code == 0, text
    row = next(line for line in text.splitlines() if "v9" in line)
    assert "1e+300" in row and ":smile: [b]x[/b]" in row
    assert "[link=http://x.example]m[/link]" in row


# -- keys of the wrong type (issue 13, defect 7) ----------------------------------------


def test_records_of_the_wrong_type_are_shown_and_gc_keeps_every_version(
    fleet: tuple[EmbeddedRedis, redis.Redis], capsys: pytest.CaptureFixture[str]
) -> None:
    """`SET hotswap:{m}:agents x` made `status` and `gc` exit 3 with WRONGTYPE. Now
    status shows what it cannot read beside the rest, and gc keeps every version
    (an agent whose record is unreadable may run any of them) and says why."""
    server, admin = fleet
    honest = st.AgentStatus("honest", "host-1", 11, state="idle", version=2)
    report(admin, "honest", honest)
    admin.set(keys.agents_key(NS, MODEL), b"x")  # what the old agent user could do
    code, text = run_cli(server, capsys, "status", MODEL)
    assert code == 0, text
    flat = " ".join(text.split())
    assert "v2" in rows_of(text)["honest"]
    assert (
        f"agent records: {keys.agents_key(NS, MODEL)} is not a hash (WRONGTYPE): the records "
        "older agents wrote there cannot be read; an admin may DEL it (agents of this version "
        "do not write it)" in flat
    )
    code, out = run_cli(server, capsys, "status", MODEL, "--json")
    assert code == 0
    data = json.loads(out)
    assert [a["agent_id"] for a in data["agents"]] == ["honest"]
    assert len(data["problems"]) == 1
    with Publisher(MODEL, settings=settings_for(acl_url(server, PUBLISHER))) as pub:
        pub.publish(make_state(3))
        kept = pub.gc(keep=1)
    assert kept.kept == [1, 2, 3] and kept.deleted_versions == []
    assert kept.pins_unknown == data["problems"]
    code, text = run_cli(server, capsys, "gc", MODEL, "--keep", "1")
    assert code == 0, text
    assert "kept every version: the agent records cannot all be read" in " ".join(text.split())


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(lambda c, k: c.hset(k, "a", "b"), id="hash"),
        pytest.param(lambda c, k: c.rpush(k, "a"), id="list"),
        pytest.param(lambda c, k: c.set(k, b"\xc1 not msgpack"), id="garbled"),
        pytest.param(lambda c, k: c.set(k, b"z" * (st.MAX_STATUS_BYTES + 1)), id="huge"),
    ],
)
def test_an_unreadable_live_record_is_shown_and_pins_every_version(
    fleet: tuple[EmbeddedRedis, redis.Redis],
    capsys: pytest.CaptureFixture[str],
    write: Callable[[redis.Redis, str], object],
) -> None:
    server, admin = fleet
    report(admin, "honest", st.AgentStatus("honest", "h", 1, state="idle", version=2))
    write(admin, keys.agent_status_key(NS, MODEL, "odd"))
    admin.set(keys.heartbeat_key(NS, MODEL, "odd"), b"1", px=60_000)
    code, text = run_cli(server, capsys, "status", MODEL)
    assert code == 0, text
    rows = rows_of(text)
    assert "unreadable" in rows["odd"] and "v2" in rows["honest"]
    with Publisher(MODEL, settings=settings_for(acl_url(server, PUBLISHER))) as pub:
        assert pub.running_versions() == [2]
        kept = pub.gc(keep=1)
    assert kept.deleted_versions == [] and len(kept.pins_unknown) == 1
    assert kept.pins_unknown[0].startswith("agent 'odd' is alive but its record is unreadable")
    # Once its heartbeat is gone it pins nothing.
    admin.delete(keys.heartbeat_key(NS, MODEL, "odd"))
    with Publisher(MODEL, settings=settings_for(acl_url(server, PUBLISHER))) as pub:
        assert pub.gc(keep=1).deleted_versions == [1]
