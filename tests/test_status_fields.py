"""The status record's fleet-safety fields (track, health, probe failures, pin): how they
travel (hotswap/status.py) and how ``hotswap status`` shows them (publisher/views.py,
publisher/render.py)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import redis
import test_cli
from agent_support import MODEL, Ten, bump, cloned
from rich.console import Console

from hotswap import status as st
from hotswap.errors import FormatError
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher import render, views
from publisher.publisher import Publisher

env = test_cli.env
run = test_cli.run


def packed(**fields: Any) -> bytes:
    return bytes(msgpack.packb({"agent_id": "a", "host": "h", "pid": 1, **fields}))


def test_a_record_older_than_these_fields_decodes_with_their_defaults() -> None:
    s = st.decode(packed(state="idle", version=3, rejected_count=1))
    assert (s.track, s.health, s.health_at, s.probe_failures, s.last_probe, s.pinned) == (
        None,
        None,
        None,
        0,
        None,
        None,
    )


def test_the_new_fields_travel_whole() -> None:
    s = st.AgentStatus(
        "a",
        "h",
        1,
        track="canary",
        health={"error_rate": 0.5, "requests": 12.0},
        health_at=1700000000.5,
        probe_failures=2,
        last_probe="v4: probe loss: 3.1 > 2.5",
        pinned=3,
    )
    assert st.decode(st.encode(s)) == s
    # An int from another writer comes back as a float, as every number does.
    assert st.decode(packed(health={"n": 3}, health_at=5)).health == {"n": 3.0}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("track", "can ary"),
        ("track", 7),
        ("health", {"error_rate": float("nan")}),
        ("health", {"error_rate": True}),
        ("health", {"bad name": 1.0}),
        ("health", {"x" * 65: 1.0}),
        ("health", {f"n{i}": 1.0 for i in range(st.MAX_HEALTH + 1)}),
        ("health", [1.0]),
        ("health_at", "now"),
        ("probe_failures", None),
        ("probe_failures", True),
        ("last_probe", 3),
        ("pinned", "3"),
    ],
)
def test_a_garbled_field_is_refused_by_name(field: str, value: Any) -> None:
    with pytest.raises(FormatError, match=f"^agent status field '{field}' has a bad value"):
        st.decode(packed(**{field: value}))


def test_the_safety_note_says_only_what_is_there() -> None:
    row = views.agent_row(
        st.AgentStatus("a", "h", 1, track="stable", probe_failures=0), True, None, None, 10.0
    )
    assert views.safety_note(row) is None
    failing = views.agent_row(
        st.AgentStatus("a", "h", 1, track="stable", health=None, health_at=9.0), True, 1, None, 10.0
    )
    assert failing["health_age"] == 1.0
    assert views.safety_note(failing) == "health unknown (callback failed)"
    two = views.agent_row(
        st.AgentStatus(
            "a", "h", 1, health={"p99_ms": 41.123456, "err": 0.0}, probe_failures=2, pinned=4
        ),
        True,
        5,
        None,
        10.0,
    )
    assert views.safety_note(two) == "pinned v4, err=0, p99_ms=41.12, 2 probe failures"


@pytest.fixture
def published(settings: HotswapSettings, client: redis.Redis) -> Iterator[int]:
    p = Publisher(MODEL, settings=settings, connection=client)
    yield p.publish(bump(cloned(Ten())))
    p.close()


def write(store: Store, agent_id: str, version: int, **fields: Any) -> None:
    lineage = store.manifest(version).lineage
    s = st.AgentStatus(
        agent_id, "host", 1, state="idle", version=version, lineage=lineage, updated=time.time()
    )
    for name, value in fields.items():
        setattr(s, name, value)
    store.write_agent_status(agent_id, st.encode(s), ttl=60)


def test_status_adds_no_column_while_every_agent_is_plain_stable(
    published: int, store: Store, run: Any
) -> None:
    write(store, "srv-a", published, track="stable")
    write(store, "srv-old", published)  # older than tracks
    code, out, _ = run("status", "m")
    assert code == 0 and "srv-a" in out and "srv-old" in out
    assert "track, health" not in out and "probe" not in out


def test_status_shows_track_pin_health_and_probe_failures(
    published: int, store: Store, run: Any
) -> None:
    write(store, "srv-a", published, track="stable")
    write(
        store,
        "srv-canary",
        published,
        track="canary",
        pinned=published,
        health={"error_rate": 0.5},
        health_at=time.time(),
        probe_failures=1,
        last_probe="v9: probe loss: 3.1 > 2.5",
    )
    code, out, _ = run("status", "m")
    assert code == 0 and "srv-canary" in out
    # The table itself, wide enough that no cell wraps.
    console = Console(width=500, record=True, file=io.StringIO())
    render.print_status(console, views.status_view(store))
    text = console.export_text()
    lines = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") > 2}
    assert "track, health, probes" in text
    note = (
        f"canary, pinned v{published}, error_rate=0.5, 1 probe failure (v9: probe loss: 3.1 > 2.5)"
    )
    assert lines["srv-canary"].rstrip(" │").endswith(note)
    assert lines["srv-a"].rstrip(" │").endswith("│ -")
    code, out, _ = run("status", "m", "--json")
    rows = {a["agent_id"]: a for a in json.loads(out)["agents"]}
    canary = rows["srv-canary"]
    assert (canary["track"], canary["pinned"], canary["health"]) == (
        "canary",
        published,
        {"error_rate": 0.5},
    )
    assert (canary["probe_failures"], canary["last_probe"]) == (1, "v9: probe loss: 3.1 > 2.5")
    assert 0 <= canary["health_age"] < 60
    assert (rows["srv-a"]["track"], rows["srv-a"]["health"], rows["srv-a"]["pinned"]) == (
        "stable",
        None,
        None,
    )


def test_a_record_with_bad_health_is_unreadable_and_hides_no_other(
    published: int, store: Store, run: Any
) -> None:
    write(store, "srv-a", published, track="canary")
    bad = packed(agent_id="srv-bad", health={"x": float("inf")}, updated=time.time())
    store.write_agent_status("srv-bad", bad, ttl=60)
    _, out, _ = run("status", "m", "--json")
    rows = {a["agent_id"]: a for a in json.loads(out)["agents"]}
    assert rows["srv-bad"]["state"] == "unreadable"
    assert rows["srv-bad"]["last_error"].startswith("agent status field 'health' has a bad value")
    assert rows["srv-a"]["track"] == "canary"
