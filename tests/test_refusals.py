"""Refused manifests known by their length and ends (issue 13, defect 6)."""

from __future__ import annotations

import redis

from hotswap import keys
from hotswap.refusals import EDGE, KEEP, Refusals, fingerprint
from hotswap.store import Store


def test_a_refused_manifest_is_unchanged_until_its_length_or_ends_change() -> None:
    data = b"\xc1" + bytes(3 * EDGE)
    refused = Refusals()
    assert 7 not in refused
    refused.remember(7, data)
    assert 7 in refused and refused.unchanged(7, fingerprint(data))
    assert not refused.unchanged(7, fingerprint(data + b"\x00"))
    assert not refused.unchanged(7, fingerprint(b"\xc2" + data[1:]))
    assert not refused.unchanged(8, fingerprint(data))
    refused.forget(7)
    assert 7 not in refused and not refused.unchanged(7, fingerprint(data))


def test_only_the_newest_refusals_are_kept() -> None:
    refused = Refusals()
    for version in range(1, KEEP + 2):
        refused.remember(version, b"x")
    assert 1 not in refused and all(v in refused for v in range(2, KEEP + 2))


def test_the_store_glances_at_what_fingerprint_computes(client: redis.Redis, store: Store) -> None:
    key = keys.manifest_key("hotswap", "m", 3)
    for data in (b"", b"short", bytes(range(256)) * 9):
        client.set(key, data)
        client.set(keys.head_key("hotswap", "m"), 3)
        assert store.head_and_glance(3, EDGE) == (3, fingerprint(data))
    client.delete(key, keys.head_key("hotswap", "m"))
    assert store.head_and_glance(3, EDGE) == (None, fingerprint(b""))
