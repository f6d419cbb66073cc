"""Agent status record: msgpack round trip and strict field types."""

from __future__ import annotations

import tracemalloc
from dataclasses import asdict
from typing import Any

import msgpack
import pytest

from hotswap import status
from hotswap.errors import FormatError
from hotswap.status import AgentStatus


def pack(value: Any) -> bytes:
    return bytes(msgpack.packb(value, use_bin_type=True))


def full_status() -> AgentStatus:
    return AgentStatus(
        agent_id="host-1.77",
        host="host-1",
        pid=77,
        state="idle",
        version=5,
        lineage="ab" * 16,
        last_error="model 'm' v6 tensor 'w': not finite",
        rejected_version=6,
        rejection={"w": ["not finite", "norm ratio 12.0 over 10"]},
        fetch_seconds=0.25,
        validate_seconds=0.5,
        apply_seconds=0.125,
        bytes_fetched=1 << 40,
        applied_count=4,
        rejected_count=1,
        updated=1700000000.5,
    )


def test_round_trip() -> None:
    s = full_status()
    assert status.decode(status.encode(s)) == s
    minimal = AgentStatus("a", "h", 1)
    assert status.decode(status.encode(minimal)) == minimal


def test_unknown_fields_are_ignored_and_missing_optional_ones_defaulted() -> None:
    raw = {"agent_id": "a", "host": "h", "pid": 1, "from_a_newer_agent": [1, 2]}
    assert status.decode(pack(raw)) == AgentStatus("a", "h", 1)


def test_integer_seconds_become_floats() -> None:
    raw = {**asdict(full_status()), "fetch_seconds": 2, "updated": 17}
    decoded = status.decode(pack(raw))
    assert decoded.fetch_seconds == 2.0 and isinstance(decoded.fetch_seconds, float)
    assert isinstance(decoded.updated, float)


def test_oversized_record_is_refused() -> None:
    with pytest.raises(FormatError) as e:
        status.decode(b"\x00" * (status.MAX_STATUS_BYTES + 1))
    assert str(e.value) == (
        f"agent status is {status.MAX_STATUS_BYTES + 1} bytes, over the "
        f"{status.MAX_STATUS_BYTES} limit"
    )


def test_malformed_msgpack_is_refused() -> None:
    with pytest.raises(FormatError, match=r"^agent status is not valid msgpack: \w+$"):
        status.decode(b"\xc1")


@pytest.mark.parametrize("raw", [[1], {"agent_id": "a", "host": "h"}, {}])
def test_missing_identity_is_refused(raw: Any) -> None:
    with pytest.raises(FormatError) as e:
        status.decode(pack(raw))
    assert str(e.value) == "agent status lacks agent_id, host or pid"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("pid", "77"),
        ("pid", True),
        ("agent_id", 5),
        ("version", 1.5),
        ("state", None),
        ("rejection", ["w"]),
        ("rejection", {"w": "not finite"}),
        ("rejection", {"w": [1]}),
        ("fetch_seconds", "fast"),
        ("bytes_fetched", None),
    ],
)
def test_bad_field_types_are_refused(field: str, value: Any) -> None:
    raw = {**asdict(full_status()), field: value}
    with pytest.raises(FormatError) as e:
        status.decode(pack(raw))
    assert str(e.value) == f"agent status field {field!r} has a bad value {value!r:.80}"


def test_long_lists_are_refused_before_allocating() -> None:
    # msgpack allocates the slots an array header declares before reading them:
    # nested headers must not add up to megabytes.
    nested = (b"\xdd" + (5000).to_bytes(4, "big")) * 1000
    tracemalloc.start()
    try:
        with pytest.raises(FormatError) as e:
            status.decode(nested)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024
    assert str(e.value) == "agent status is not valid msgpack: ValueError"
    raw = {**asdict(full_status()), "rejection": {"w": ["r"] * (status.MAX_LIST + 1)}}
    with pytest.raises(FormatError, match=r"^agent status is not valid msgpack: ValueError$"):
        status.decode(pack(raw))
    # What the reporter writes (5 reasons for each of 50 tensors) stays far inside.
    most = {f"t{i}": ["x" * 300] * 5 for i in range(50)}
    assert status.decode(pack({**raw, "rejection": most})).rejection == most


def test_manifest_digest_round_trips_and_records_of_older_agents_lack_it() -> None:
    s = full_status()
    s.manifest_digest = "c" * 64
    assert status.decode(status.encode(s)).manifest_digest == "c" * 64
    # An agent older than the field writes none: read as unknown.
    older = {k: v for k, v in asdict(full_status()).items() if k != "manifest_digest"}
    assert status.decode(pack(older)).manifest_digest is None
    with pytest.raises(FormatError, match=r"^agent status field 'manifest_digest' has a bad"):
        status.decode(pack({**older, "manifest_digest": 7}))
