"""Fingerprints: a publisher finds the digest of bytes it saw before without hashing them.

The table itself is pure; the publisher tests run against the test Redis and
count BLAKE3 passes by wrapping ``codec.digest`` (the real one still runs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pytest
import redis
import torch

from hotswap import codec
from hotswap.errors import SourceError
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher import hashing, upload
from publisher.fingerprint import Fingerprints, fingerprint
from publisher.publisher import Publisher

SHAPES = {"embed.weight": (64, 32), "layer.0.weight": (32, 32), "layer.0.bias": (32,),
          "layer.1.weight": (32, 32)}  # fmt: skip


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}


def true_digests(sd: dict[str, torch.Tensor]) -> dict[str, str]:
    return {n: codec.digest(codec.as_bytes(t)) for n, t in sd.items()}


def stored_digests(store: Store, version: int) -> dict[str, str]:
    return {e.name: e.digest for e in store.manifest(version).tensors}


@pytest.fixture
def pub(settings: HotswapSettings, client: redis.Redis) -> Iterator[Publisher]:
    with Publisher("m", settings=settings, connection=client) as p:
        yield p


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the buffers the publisher hashes with BLAKE3, in order."""
    sizes: list[int] = []
    real = codec.digest

    def counting(buf: bytes | bytearray | memoryview) -> str:
        sizes.append(len(buf))
        return real(buf)

    monkeypatch.setattr(codec, "digest", counting)
    return sizes


# -- the table ------------------------------------------------------------------------


def test_fingerprint_is_16_bytes_and_sees_one_flipped_bit() -> None:
    data = bytearray(torch.randn(1000).numpy().tobytes())
    before = fingerprint(memoryview(data))
    data[517] ^= 0x01
    assert len(before) == 16
    assert fingerprint(bytes(data)) != before
    data[517] ^= 0x01
    assert fingerprint(bytes(data)) == before


def test_table_learns_and_retains_only_the_given_digests() -> None:
    memo = Fingerprints()
    assert memo.digest_of(b"a" * 16) is None
    memo.learn(b"a" * 16, "d1")
    memo.learn(b"b" * 16, "d2")
    memo.learn(b"c" * 16, "d1")
    assert memo.digest_of(b"a" * 16) == "d1" and len(memo) == 3
    memo.retain({"d1"})
    assert len(memo) == 2
    assert memo.digest_of(b"b" * 16) is None
    assert memo.digest_of(b"c" * 16) == "d1"


# -- a publisher that publishes the same state dict again ------------------------------


def test_unchanged_tensors_are_not_hashed_again(
    pub: Publisher, store: Store, hashed: list[int]
) -> None:
    sd = weights()
    assert pub.publish(sd) == 1
    assert len(hashed) == len(sd)
    hashed.clear()
    with torch.no_grad():
        sd["layer.0.bias"].add_(1)
    assert pub.publish(sd) == 2
    assert hashed == [sd["layer.0.bias"].nbytes]  # the changed one only
    assert stored_digests(store, 2) == true_digests(sd)
    assert pub.last_report.tensors_changed == 1
    hashed.clear()
    assert pub.publish(sd) == 2 and pub.last_report.created is False
    assert hashed == []


def test_a_new_publisher_learns_heads_bytes_on_its_first_publish(
    pub: Publisher, settings: HotswapSettings, client: redis.Redis, hashed: list[int]
) -> None:
    sd = weights()
    pub.publish(sd)
    with Publisher("m", settings=settings, connection=client) as other:
        hashed.clear()
        assert other.publish(sd) == 1 and other.last_report.created is False
        assert len(hashed) == len(sd)  # nothing known yet
        hashed.clear()
        assert other.publish(sd) == 1
        assert hashed == []


def test_reverted_tensor_is_hashed_again_and_reuses_its_blob(
    pub: Publisher, store: Store, hashed: list[int]
) -> None:
    # The table holds head's contents only: v1's bytes were forgotten at v2.
    sd = weights()
    pub.publish(sd)
    original = sd["layer.1.weight"].clone()
    with torch.no_grad():
        sd["layer.1.weight"].mul_(2)
    pub.publish(sd)
    with torch.no_grad():
        sd["layer.1.weight"].copy_(original)
    hashed.clear()
    assert pub.publish(sd) == 3
    assert hashed == [original.nbytes]
    assert stored_digests(store, 3) == stored_digests(store, 1) == true_digests(sd)
    assert pub.last_report.bytes_uploaded == 0


def test_table_keeps_only_heads_contents(pub: Publisher) -> None:
    sd = weights()
    for step in range(5):
        with torch.no_grad():
            sd["embed.weight"].add_(1)
        assert pub.publish(sd) == step + 1
    assert len(pub._fingerprints) == len(sd)


# -- bytes that change while they are read are never learned ---------------------------


class Racer:
    """Runs ``write`` (a training step racing the publish) right after the
    ``call``-th fingerprint of ``tensor``'s bytes is taken."""

    def __init__(
        self,
        monkeypatch: pytest.MonkeyPatch,
        tensor: torch.Tensor,
        call: int,
        write: Callable[[], object],
    ) -> None:
        self.calls = 0
        self.armed = True
        real = fingerprint

        def racing(buf: bytes | bytearray | memoryview) -> bytes:
            fp = real(buf)
            if self.armed and address(buf) == tensor.data_ptr():
                self.calls += 1
                if self.calls == call:
                    with torch.no_grad():
                        write()
            return fp

        # The first fingerprint is taken while hashing, the second after the upload.
        monkeypatch.setattr(hashing, "fingerprint", racing)
        monkeypatch.setattr(upload, "fingerprint", racing)


def address(buf: bytes | bytearray | memoryview) -> int:
    return int(np.frombuffer(buf, np.uint8).__array_interface__["data"][0])


def test_write_between_fingerprint_and_digest_is_refused_and_not_learned(
    pub: Publisher, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    pub.publish(weights())
    sd = weights(1)
    first = sd["layer.0.weight"].clone()
    racer = Racer(monkeypatch, sd["layer.0.weight"], 1, lambda: sd["layer.0.weight"].add_(1))
    with pytest.raises(
        SourceError,
        match=r"^state dict: tensor 'layer\.0\.weight' changed while it was being published; "
        "publish again once it is stable$",
    ):
        pub.publish(sd)
    assert racer.calls == 2  # before its digest, and after its upload
    assert store.head() == 1 and store.versions() == [1]
    # The bytes it was first fingerprinted as were not tied to the later bytes' digest.
    racer.armed = False
    with torch.no_grad():
        sd["layer.0.weight"].copy_(first)
    assert pub.publish(sd) == 2
    assert stored_digests(store, 2) == true_digests(sd)


def test_tensor_reverted_to_heads_bytes_while_read_is_not_learned(
    pub: Publisher,
    settings: HotswapSettings,
    client: redis.Redis,
    store: Store,
    monkeypatch: pytest.MonkeyPatch,
    hashed: list[int],
) -> None:
    sd = weights()
    pub.publish(sd)
    target = sd["layer.1.weight"]
    heads = target.clone()
    changed = heads * 2
    with Publisher("m", settings=settings, connection=client) as other:
        # Fingerprinted while it holds new bytes, hashed after it went back to
        # head's: the publish sees head's tensor, and must not tie the new
        # bytes' fingerprint to head's digest.
        with torch.no_grad():
            target.copy_(changed)
        racer = Racer(monkeypatch, target, 1, lambda: target.copy_(heads))
        assert other.publish(sd) == 1 and other.last_report.created is False
        assert racer.calls == 2  # before the hash, and the look again after it
        racer.armed = False
        with torch.no_grad():
            target.copy_(changed)
        hashed.clear()
        assert other.publish(sd) == 2
        assert hashed == [target.nbytes]
        assert stored_digests(store, 2) == true_digests(sd)
