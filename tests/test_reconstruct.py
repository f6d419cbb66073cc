"""Reconstructing a tensor from full and delta blobs (hotswap.reconstruct), against a real Redis.

Versions are made by hand (tests/delta_support.py): a chain of small sparse
steps of a float32 tensor cut in 4 KiB chunks (three frames each), some
versions stored full, some as keyframes, some as deltas only.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import redis
import torch
from delta_support import CHUNK, Versions, flip, nudged

from hotswap import candidates, codec, delta, keys, reconstruct
from hotswap.blobs import BlobStore
from hotswap.candidates import History
from hotswap.errors import IntegrityError, NotFound
from hotswap.manifest import Manifest
from hotswap.reconstruct import Rebuild
from hotswap.store import Store

NAME = "w"


def first() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {NAME: torch.randn(40, 64, generator=g)}  # 10 KiB: chunks of 4, 4 and 2 KiB


def chain(store: Store, steps: int, how: dict[int, str] | None = None) -> Versions:
    """v1 full, then ``steps`` sparse steps stored as ``how`` says (default: delta)."""
    vs = Versions(store)
    state = first()
    vs.commit(state, default="full")
    for k in range(2, steps + 2):
        state = {NAME: nudged(state[NAME], seed=k)}
        vs.commit(state, {NAME: (how or {}).get(k, "delta")})
    return vs


class Counted:
    """Older manifests, counted (``candidates.Manifests``)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.read: list[int] = []

    def manifest(self, version: int) -> Manifest:
        self.read.append(version)
        return self.store.manifest(version)


def rebuild(store: Store, vs: Versions, version: int, history: Counted | None = None) -> Rebuild:
    m = vs.manifests[version]
    h = History(history or Counted(store), m)
    return Rebuild(store.blobs, m, m.by_name()[NAME], history=h, where=f"model 'm' v{version}")


def live_at(vs: Versions, version: int) -> reconstruct.Live:
    t = vs.states[version][NAME]
    return vs.entry(version, NAME).digest, lambda: codec.as_bytes(t)


def into(rb: Rebuild, live: reconstruct.Live | None = None) -> bytes:
    out = bytearray(rb.entry.nbytes)
    rb.into(memoryview(out), live)
    return bytes(out)


def expected(vs: Versions, version: int) -> bytes:
    return bytes(codec.as_bytes(vs.states[version][NAME]))


def stored(vs: Versions, *versions: int) -> int:
    return sum(vs.entry(v, NAME).delta.stored_bytes for v in versions)  # type: ignore[union-attr]


# -- reading a delta blob ----------------------------------------------------------


@pytest.mark.parametrize("path", ["fast", "pipelined"])
def test_frames_read_back_as_stored_one_at_a_time(client: redis.Redis, path: str) -> None:
    store = Store(client, "m")
    vs = chain(store, 1)
    blobs = BlobStore(client, "m")
    if path == "pipelined":
        blobs.__dict__["_blob_io"] = None  # the cached fast path, switched off
    entry = vs.entry(2, NAME)
    got = [bytes(f) for f in blobs.frames(entry, version=2)]
    assert got == vs.frames[(2, NAME)] and len(got) == 3


@pytest.mark.parametrize("path", ["fast", "pipelined"])
def test_a_missing_or_oversized_frame_or_a_wrong_total_is_refused_naming_it(
    client: redis.Redis, path: str
) -> None:
    store = Store(client, "m")
    vs = chain(store, 1)
    blobs = BlobStore(client, "m")
    if path == "pipelined":
        blobs.__dict__["_blob_io"] = None
    entry = vs.entry(2, NAME)
    key = vs.frame_key(2, NAME, 1)
    frame = client.get(key)
    assert frame is not None
    client.set(key, frame + b"x" * delta.max_frame_bytes(CHUNK))
    with pytest.raises(IntegrityError) as e:
        list(blobs.frames(entry, version=2))
    cap = delta.max_frame_bytes(CHUNK)
    assert str(e.value) == (
        f"model 'm' v2 tensor 'w': delta frame 1 of 3 is {len(frame) + cap} bytes, over the "
        f"{cap} a frame of its chunk can take; publish again"
    )
    client.set(key, frame + b"x")
    with pytest.raises(IntegrityError, match=r"frames add up to more than bytes, the manifest"):
        list(blobs.frames(entry, version=2))
    client.set(key, frame[:-1])
    with pytest.raises(IntegrityError, match=rf"frames add up to {entry.delta.stored_bytes - 1} "):  # type: ignore[union-attr]
        list(blobs.frames(entry, version=2))
    client.delete(key)
    with pytest.raises(IntegrityError) as e:
        list(blobs.frames(entry, version=2))
    assert str(e.value) == (
        "model 'm' v2 tensor 'w': delta frame 1 of 3 is missing from Redis (collected or "
        "lost); publish again"
    )


# -- routes --------------------------------------------------------------------------


def test_at_the_parent_only_the_delta_is_fetched_and_decoded_bit_exact(store: Store) -> None:
    vs = chain(store, 1)
    manifests = Counted(store)
    rb = rebuild(store, vs, 2, manifests)
    assert into(rb, live_at(vs, 1)) == expected(vs, 2)
    assert rb.fetched == stored(vs, 2) < vs.entry(2, NAME).nbytes / 10
    assert manifests.read == []  # the version's own delta was enough


def test_a_late_reader_goes_from_the_keyframe_through_the_chain(store: Store) -> None:
    vs = chain(store, 6, {4: "keyframe"})  # v1 full, v2-v3 deltas, v4 keyframe, v5-v7 deltas
    manifests = Counted(store)
    rb = rebuild(store, vs, 7, manifests)
    route = rb.into(memoryview(out := bytearray(rb.entry.nbytes)))
    assert bytes(out) == expected(vs, 7)
    assert route.full is not None and route.full.digest == vs.entry(4, NAME).digest
    assert [link.delta.result for link in route.links] == [
        vs.entry(v, NAME).digest for v in (5, 6, 7)
    ]
    assert rb.fetched == vs.entry(4, NAME).nbytes + stored(vs, 5, 6, 7)
    assert manifests.read == [6, 5, 4]  # back to the keyframe, no further
    assert rb.check().full == route.full  # the same, hashed chunk by chunk


def test_a_reader_that_missed_versions_takes_the_cheapest_route(store: Store) -> None:
    vs = chain(store, 6, {4: "keyframe"})
    manifests = Counted(store)
    rb = rebuild(store, vs, 7, manifests)
    route = rb.into(memoryview(out := bytearray(rb.entry.nbytes)), live_at(vs, 2))
    assert bytes(out) == expected(vs, 7)
    # Five small deltas from what runs beat the keyframe's full blob and three.
    assert route.full is None and len(route.links) == 5
    assert rb.fetched == stored(vs, 3, 4, 5, 6, 7)
    assert manifests.read == [6, 5, 4, 3]


def test_a_step_undone_reads_the_same_delta_backwards(store: Store) -> None:
    vs = chain(store, 1)
    back = vs.commit(vs.states[1], {NAME: "back"}, rollback_to=1)
    assert vs.entry(back, NAME).delta.blob == vs.entry(2, NAME).delta.blob  # type: ignore[union-attr]
    rb = rebuild(store, vs, back)
    route = rb.into(memoryview(out := bytearray(rb.entry.nbytes)), live_at(vs, 2))
    assert bytes(out) == expected(vs, 1)
    assert route.full is None and len(route.links) == 1
    assert rb.fetched == stored(vs, 2)


def test_a_rollback_by_many_steps_walks_the_chain_backwards(store: Store) -> None:
    vs = chain(store, 4)  # v1 full, v2-v5 deltas
    # A rollback to v2 copies v2's entry: a delta from v1, whose full blob is stored.
    v6 = vs.rollback(2)
    manifests = Counted(store)
    rb = rebuild(store, vs, v6, manifests)
    route = rb.into(memoryview(out := bytearray(rb.entry.nbytes)), live_at(vs, 5))
    assert bytes(out) == expected(vs, 2)
    assert route.full is None and [link.backwards for link in route.links] == [True] * 3
    assert rb.fetched == stored(vs, 3, 4, 5)
    assert manifests.read == [5, 4, 3]


# -- broken blobs ----------------------------------------------------------------------


def test_a_corrupted_frame_is_dropped_and_with_no_other_route_the_tensor_is_refused(
    store: Store,
) -> None:
    vs = chain(store, 1)
    flip(store.client, vs.frame_key(2, NAME, 1), at=50)  # in the result chunk's digest
    rb = rebuild(store, vs, 2)
    with pytest.raises(IntegrityError) as e:
        into(rb, live_at(vs, 1))
    message = str(e.value)
    assert message.startswith(
        "model 'm' v2 tensor 'w': cannot be reconstructed from stored blobs: no full blob or "
        "live bytes start a chain of deltas to"
    )
    # The last link's chunks are checked by the tensor's digest, not hashed
    # one by one: the digests its frames carry must still be the signed ones.
    assert "delta blob of v2 does not carry the chunk digests its manifest signs" in message
    assert message.endswith("; publish a full version")
    assert set(rb.broken) == {vs.entry(2, NAME).delta.blob}  # type: ignore[union-attr]


def forge(store: Store, vs: Versions, version: int) -> int:
    """Replace a frame of ``version``'s delta (from ``version - 1``) with one that decodes
    to other bytes under the same digests and length; the chunk it is of."""
    base, new = expected(vs, version - 1), expected(vs, version)
    # The first chunk the step changed, and the elements it changed there.
    at, changed = next(
        (k, found)
        for k in range(3)
        if (
            found := [
                i
                for i in range(k * CHUNK, min((k + 1) * CHUNK, len(new)), 4)
                if new[i : i + 4] != base[i : i + 4]
            ]
        )
    )
    key = vs.frame_key(version, NAME, at)
    real = store.client.get(key)
    header = delta.read_header(real)
    span = slice(at * CHUNK, (at + 1) * CHUNK)

    def forged(i: int) -> bytes:
        other = bytearray(new[span])
        other[i - span.start] ^= 0x40  # in an element that changed anyway: as many changes
        return delta.encode_frame(
            other,
            base[span],
            itemsize=4,
            encoding=header.encoding,
            base_digest=header.base_digest,
            result_digest=header.result_digest,
        )

    # As long as the real frame, so that the frames still add up to the manifest's bytes.
    tries = (forged(i + b) for i in changed for b in range(4))
    store.client.set(key, next(f for f in tries if len(f) == len(real)))
    return at


def test_a_frame_forged_to_decode_to_other_bytes_is_blamed_on_its_delta(store: Store) -> None:
    """A frame whose payload decodes to other bytes under the right digests fails the
    tensor's digest; the route is run again, each chunk checked, to find the blob."""
    vs = chain(store, 1)
    at = forge(store, vs, 2)
    rb = rebuild(store, vs, 2)
    with pytest.raises(IntegrityError) as e:
        into(rb, live_at(vs, 1))
    message = str(e.value)
    assert f"chunk {at} (delta of v2)" in message and message.endswith("; publish a full version")
    assert set(rb.broken) == {vs.entry(2, NAME).delta.blob}  # type: ignore[union-attr]


def test_a_forged_link_inside_a_late_readers_chain_is_found_and_routed_around(
    store: Store,
) -> None:
    """Links inside a chain are not hashed chunk by chunk on the way (the result's
    digest is): a forged one fails that, is found on a checked run and dropped; the
    reader then goes from v3's keyframe instead."""
    vs = chain(store, 4, how={3: "keyframe"})  # v1 full, v2 delta, v3 both, v4, v5 deltas
    at = forge(store, vs, 3)
    rb = rebuild(store, vs, 5)
    route = rb.into(memoryview(out := bytearray(rb.entry.nbytes)), live_at(vs, 1))
    assert bytes(out) == expected(vs, 5)
    assert route.full is not None and route.full.digest == vs.entry(3, NAME).digest
    forged = vs.entry(3, NAME).delta.blob  # type: ignore[union-attr]
    assert set(rb.broken) == {forged} and f"chunk {at} (delta of v3)" in rb.broken[forged]


def test_a_lost_delta_falls_back_to_the_keyframes_full_blob(store: Store) -> None:
    vs = chain(store, 1, {2: "keyframe"})
    store.client.delete(vs.frame_key(2, NAME, 2))
    rb = rebuild(store, vs, 2)
    route = rb.into(memoryview(out := bytearray(rb.entry.nbytes)), live_at(vs, 1))
    assert bytes(out) == expected(vs, 2) and route.full is not None and not route.links
    assert list(rb.broken) == [vs.entry(2, NAME).delta.blob]  # type: ignore[union-attr]


def test_a_lost_base_never_gives_wrong_bytes(store: Store) -> None:
    vs = chain(store, 2, {3: "keyframe"})  # v1 full, v2 delta, v3 keyframe
    store.client.delete(*vs.full_keys(1, NAME))
    with pytest.raises(IntegrityError, match="cannot be reconstructed"):
        into(rebuild(store, vs, 2))  # v1's full blob was its only start
    rb = rebuild(store, vs, 3)
    assert into(rb) == expected(vs, 3) and rb.fetched == vs.entry(3, NAME).nbytes


def test_a_collected_parent_manifest_leaves_only_full_blobs(store: Store) -> None:
    vs = chain(store, 2)
    store.client.delete(keys.manifest_key(store.ns, store.model, 2))
    with pytest.raises(IntegrityError, match="cannot be reconstructed"):
        into(rebuild(store, vs, 3))
    with pytest.raises(NotFound):
        store.manifest(2)


def test_live_bytes_that_are_not_their_digest_are_dropped_for_a_full_start(store: Store) -> None:
    vs = chain(store, 1)
    digest, _ = live_at(vs, 1)
    wrong = vs.states[1][NAME].clone()
    wrong[0, 0] += 1
    rb = rebuild(store, vs, 2)
    route = rb.into(
        memoryview(out := bytearray(rb.entry.nbytes)), (digest, lambda: codec.as_bytes(wrong))
    )
    assert bytes(out) == expected(vs, 2)
    assert route.full is not None and list(rb.broken) == [""]


def test_frames_forged_to_agree_with_themselves_fail_the_signed_frames_digest(
    store: Store,
) -> None:
    vs = chain(store, 1, {2: "keyframe"})
    old, new = vs.states[1][NAME].view(-1), vs.states[2][NAME].view(-1)
    at = int((old != new).nonzero()[0])  # a changed element: its chunk's frame is a patch
    i, per = at * 4 // CHUNK, CHUNK // 4
    original = vs.frames[(2, NAME)][i]
    for bump in range(1, 100):  # another value there, in a frame of the same length
        forged = new.clone()
        forged[at] += bump
        frame = delta.encode_frame(
            codec.as_bytes(forged[i * per : (i + 1) * per]),
            codec.as_bytes(old[i * per : (i + 1) * per]),
            itemsize=4,
        )
        if len(frame) == len(original):
            break
    assert len(frame) == len(original) and frame != original
    store.client.set(vs.frame_key(2, NAME, i), frame)
    rb = rebuild(store, vs, 2)
    route = rb.into(memoryview(out := bytearray(rb.entry.nbytes)), live_at(vs, 1))
    assert bytes(out) == expected(vs, 2) and route.full is not None
    (why,) = rb.broken.values()
    assert "does not carry the chunk digests its manifest signs" in why


def test_the_history_walk_is_bounded(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reconstruct, "HISTORY_SLACK", 2)
    vs = chain(store, 8)  # v1 full, v2-v9 deltas: depth 8 at v9
    manifests = Counted(store)
    rb = rebuild(store, vs, 9, manifests)
    assert into(rb) == expected(vs, 9)
    assert len(manifests.read) == 8  # v8 .. v1: within 8 + 2
    m = vs.manifests[9]
    lying = candidates.Candidates(m.by_name()[NAME])
    assert not lying.fulls
    # A manifest that says its chain is shorter than it is: the walk stops at its word.
    short = Counted(store)
    entry = vs.entry(9, NAME)
    low = replace(entry, delta=replace(entry.delta, depth=1))  # type: ignore[type-var]
    rb = Rebuild(store.blobs, m, low, history=History(short, m), where="model 'm' v9")
    with pytest.raises(IntegrityError, match="cannot be reconstructed"):
        into(rb)
    assert short.read == [8, 7, 6]  # depth 1 + 2, never the whole history
