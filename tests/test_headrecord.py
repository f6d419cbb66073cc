"""The signed head record and the agent's watermark. Pure."""

from __future__ import annotations

import msgpack
import pytest

from hotswap import headrecord
from hotswap.errors import FormatError, SignatureError
from hotswap.headrecord import HeadRecord, Watermark

KEY, OTHER = b"k" * 32, b"o" * 32
LINEAGE = "ab" * 16
DIGEST = "0" * 64


def record(version: int = 3, issued: float = 1000.0, expires: float | None = None) -> HeadRecord:
    return HeadRecord("m", version, LINEAGE, DIGEST, issued=issued, expires=expires)


def test_round_trip_keeps_every_field_and_the_key_id() -> None:
    r = record(expires=2000.0)
    back = headrecord.decode(headrecord.encode(r, KEY), keys=[OTHER, KEY], expect_model="m")
    assert (back.model, back.version, back.lineage, back.manifest) == ("m", 3, LINEAGE, DIGEST)
    assert (back.issued, back.expires) == (1000.0, 2000.0)
    assert back.key_id is not None and back.names(3, LINEAGE, DIGEST)
    assert not back.names(3, LINEAGE, "1" * 64) and not back.names(2, LINEAGE, DIGEST)


def test_unknown_key_and_altered_body_are_refused() -> None:
    data = headrecord.encode(record(), KEY)
    with pytest.raises(SignatureError, match="unknown key id"):
        headrecord.decode(data, keys=[OTHER], expect_model="m")
    env = msgpack.unpackb(data, raw=False)
    body = msgpack.unpackb(env["body"], raw=False)
    body["version"] = 2
    env["body"] = msgpack.packb(body, use_bin_type=True)
    with pytest.raises(SignatureError, match="altered after signing"):
        headrecord.decode(msgpack.packb(env, use_bin_type=True), keys=[KEY], expect_model="m")
    env["sig"] = None
    with pytest.raises(SignatureError, match="unsigned"):
        headrecord.decode(msgpack.packb(env, use_bin_type=True), keys=[KEY], expect_model="m")


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"x" * 5000, msgpack.packb([1, 2]), msgpack.packb({"format": 1})],
)
def test_garbage_is_a_format_error(data: bytes) -> None:
    with pytest.raises(FormatError):
        headrecord.decode(data, keys=[KEY], expect_model="m")


def test_a_record_of_another_model_is_refused() -> None:
    with pytest.raises(FormatError, match="belongs to model 'm'"):
        headrecord.decode(headrecord.encode(record(), KEY), keys=[KEY], expect_model="n")


def test_watermark_refuses_older_records_across_lineages() -> None:
    mark = Watermark()
    assert mark.refusal(record(3, 1000.0), now=0) is None
    mark.accept(record(3, 1000.0))
    newer_lineage = HeadRecord("m", 1, "cd" * 16, DIGEST, issued=1001.0)
    assert mark.refusal(newer_lineage, now=0) is None  # a reset Redis, signed as newer
    mark.accept(newer_lineage)
    reason = mark.refusal(record(2, 999.0), now=0)
    assert reason is not None and "replayed or rolled-back" in reason
    assert mark.refusal(record(3, 1000.0), now=0) is not None  # older than the new lineage
    assert mark.newest is newer_lineage


def test_required_expiry_refuses_records_without_one_or_past_it() -> None:
    mark = Watermark(require_expiry=True)
    assert "carries no expiry" in (mark.refusal(record(), now=1500.0) or "")
    assert "expired at" in (mark.refusal(record(expires=1400.0), now=1500.0) or "")
    assert mark.refusal(record(expires=1600.0), now=1500.0) is None
