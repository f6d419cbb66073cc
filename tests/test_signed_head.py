"""The publisher's signed head record: written with every commit, re-issued by resign.

Issue 13, defect 2 (writer side): a publisher with a signing key writes a
signed head record (``hotswap.headrecord``) in the commit script itself, so
head, manifest and record change together; ``resign`` re-issues it for the
same head with a new issue time and expiry.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import torch
from pydantic import SecretStr

from hotswap import codec, headrecord, keys
from hotswap import manifest as mf
from hotswap.errors import ConfigError, NotFound, SignatureError, VersionConflict
from hotswap.headrecord import HeadRecord
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher import cli, commit
from publisher.publisher import Publisher

KEY = b"publisher-key-0123456789"
RECORD = keys.head_record_key("hotswap", "m")
HEAD = keys.head_key("hotswap", "m")


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layer.{i}.weight": torch.randn(16, 16, generator=g) for i in range(3)}


def keyed(settings: HotswapSettings, **changes: Any) -> HotswapSettings:
    return settings.model_copy(update={"signing_keys": [SecretStr(KEY.decode())], **changes})


@pytest.fixture
def signed(settings: HotswapSettings, client: redis.Redis) -> Iterator[Publisher]:
    with Publisher("m", settings=keyed(settings), connection=client) as p:
        yield p


def record_of(client: redis.Redis) -> HeadRecord:
    data = client.get(RECORD)
    assert data is not None, "no signed head record"
    return headrecord.decode(data, keys=[KEY], expect_model="m")


def names_head(client: redis.Redis, store: Store, record: HeadRecord) -> None:
    """``record`` names head exactly: version, lineage, the manifest's wire bytes, created."""
    head = store.head()
    assert head is not None and record.version == head
    data = store.manifest_bytes(head)
    m = store.manifest(head, [KEY])
    assert record.names(head, m.lineage, codec.digest(data))
    assert record.key_id == mf.key_id(KEY)


def test_publish_and_rollback_write_a_verifying_record(
    signed: Publisher, store: Store, client: redis.Redis
) -> None:
    v1 = signed.publish(weights(1))
    first = record_of(client)
    names_head(client, store, first)
    assert first.issued == store.manifest(v1).created and first.expires is None
    v2 = signed.publish(weights(2))
    second = record_of(client)
    names_head(client, store, second)
    v3 = signed.rollback()
    third = record_of(client)
    names_head(client, store, third)
    assert (v1, v2, v3) == (1, 2, 3) and store.manifest(v3).rollback_to == v1
    assert first.issued < second.issued < third.issued


def test_expiry_follows_the_setting(
    settings: HotswapSettings, client: redis.Redis, store: Store
) -> None:
    with Publisher("m", settings=keyed(settings, head_expiry_seconds=90), connection=client) as p:
        p.publish(weights(1))
    record = record_of(client)
    assert record.expires == record.issued + 90


def test_unsigned_publish_leaves_no_record_and_deletes_a_stale_one(
    pub_unsigned: Publisher, signed: Publisher, client: redis.Redis
) -> None:
    pub_unsigned.publish(weights(1))
    assert client.get(RECORD) is None
    signed.publish(weights(2))
    assert record_of(client).version == 2
    # A publisher without the key moves head: the record naming v2 goes with it.
    pub_unsigned.publish(weights(3))
    assert client.get(HEAD) == b"3" and client.get(RECORD) is None


@pytest.fixture
def pub_unsigned(settings: HotswapSettings, client: redis.Redis) -> Iterator[Publisher]:
    with Publisher("m", settings=settings, connection=client) as p:
        yield p


def test_creation_and_issue_times_increase_when_the_clock_steps_back(
    signed: Publisher, store: Store, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [2_000_000_000.0]
    monkeypatch.setattr(commit, "now", lambda: clock[0])
    signed.publish(weights(1))
    clock[0] -= 3600  # NTP stepped the clock back an hour
    signed.publish(weights(2))
    signed.rollback()
    created = [store.manifest(v).created for v in (1, 2, 3)]
    assert created[0] < created[1] < created[2]
    assert record_of(client).issued == created[2]
    # A re-sign issued "later" than the clock says is honoured by the next publish too.
    clock[0] -= 3600
    resigned = signed.resign()
    signed.publish(weights(4))
    assert store.manifest(4).created > resigned.issued > created[2]


def test_resign_moves_issued_forward_and_keeps_the_version(
    settings: HotswapSettings, client: redis.Redis, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [2_000_000_000.0]
    monkeypatch.setattr(commit, "now", lambda: clock[0])
    with Publisher("m", settings=keyed(settings, head_expiry_seconds=60), connection=client) as p:
        p.publish(weights(1))
        p.publish(weights(2))
        before = record_of(client)
        manifests = {v: store.manifest_bytes(v) for v in (1, 2)}
        clock[0] += 40
        record = p.resign()
    assert record_of(client) == record
    assert (record.version, record.lineage, record.manifest) == (
        before.version,
        before.lineage,
        before.manifest,
    )
    assert record.issued == clock[0] > before.issued
    assert record.expires == clock[0] + 60
    assert client.get(HEAD) == b"2"
    assert {v: store.manifest_bytes(v) for v in (1, 2)} == manifests  # no new version


def test_resign_refused_when_head_or_record_changed_since_it_read_them(
    signed: Publisher, store: Store, client: redis.Redis
) -> None:
    signed.publish(weights(1))
    old = client.get(RECORD)
    signed.publish(weights(2))  # a commit landed after a re-sign read head v1
    current = client.get(RECORD)
    assert not store.replace_head_record(1, old, b"new record")
    assert not store.replace_head_record(2, old, b"new record")  # head matches, record not
    assert client.get(RECORD) == current and client.get(HEAD) == b"2"
    assert store.replace_head_record(2, current, b"new record")
    assert client.get(RECORD) == b"new record"


def test_resign_racing_a_commit_writes_nothing(
    signed: Publisher, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    signed.publish(weights(1))
    rival = Store(client, "m")
    original = Store.head_for_commit

    def a_commit_lands_after_the_read(self: Store, guess: int | None) -> Any:
        read = original(self, guess)
        monkeypatch.setattr(Store, "head_for_commit", original)
        with Publisher("m", settings=signed.settings, connection=client) as other:
            other.publish(weights(2))
        return read

    monkeypatch.setattr(Store, "head_for_commit", a_commit_lands_after_the_read)
    with pytest.raises(VersionConflict) as e:
        signed.resign()
    assert str(e.value) == (
        "model 'm': head or its signed record changed while re-signing v1 (a publish, "
        "rollback or re-sign committed first); nothing written: run `hotswap resign` again"
    )
    assert record_of(client).version == 2 == rival.head()


def test_resign_refuses_a_head_that_does_not_verify(
    settings: HotswapSettings, pub_unsigned: Publisher, signed: Publisher, client: redis.Redis
) -> None:
    pub_unsigned.publish(weights(1))
    before = {k: client.dump(k) for k in client.keys("*")}
    with pytest.raises(SignatureError) as e:
        signed.resign()
    assert str(e.value) == (
        "model 'm': will not re-sign head v1: manifest of m v1 is unsigned, but signing keys "
        "are configured; publish or roll back to put a version signed with this key on top"
    )
    assert {k: client.dump(k) for k in client.keys("*")} == before
    with pytest.raises(ConfigError, match="re-signing head needs a signing key"):
        pub_unsigned.resign()
    client.flushall()
    with pytest.raises(NotFound, match="has no versions: no head to re-sign"):
        signed.resign()


def test_cli_resign(
    settings: HotswapSettings,
    signed: Publisher,
    client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    signed.publish(weights(1))
    for k in ("HOTSWAP_REDIS_URL", "HOTSWAP_SIGNING_KEYS", "HOTSWAP_HEAD_EXPIRY_SECONDS"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir("/")
    monkeypatch.setenv("HOTSWAP_REDIS_URL", settings.redis_url)
    assert cli.main(["resign", "m"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "hotswap: error: model 'm': re-signing head needs a signing key; set HOTSWAP_SIGNING_KEYS\n"
    )
    monkeypatch.setenv("HOTSWAP_SIGNING_KEYS", KEY.decode())
    monkeypatch.setenv("HOTSWAP_HEAD_EXPIRY_SECONDS", "3600")
    before = record_of(client)
    assert cli.main(["resign", "m"]) == 0
    out = capsys.readouterr().out
    after = record_of(client)
    assert after.version == 1 and after.issued > before.issued
    assert after.expires == after.issued + 3600
    assert out.startswith("model m: re-signed head v1, issued ")
    assert out.rstrip().endswith("expires in 3600 s")
    assert cli.main(["resign", "m", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["version"] == 1 and data["expires"] == data["issued"] + 3600


def test_resign_never_signs_a_head_moved_by_someone_without_the_key(
    signed: Publisher, client: redis.Redis, store: Store
) -> None:
    """v1, v2, a rollback to v1 (v3); an intruder sets the plain head back to the
    retracted v2. A scheduled re-sign must not bless it: agents follow the record."""
    signed.publish(weights(1))
    signed.publish(weights(2))
    signed.rollback(to=1)
    client.set(HEAD, b"2")
    before = {k: client.dump(k) for k in client.keys("*")}
    with pytest.raises(VersionConflict) as e:
        signed.resign()
    assert str(e.value) == (
        "model 'm': head says v2 but the signed head names v3: someone without the signing "
        "key moved head; nothing re-signed. Put head back with `hotswap rollback` or a "
        "publish, which sign a new head"
    )
    assert {k: client.dump(k) for k in client.keys("*")} == before
    assert record_of(client).version == 3
