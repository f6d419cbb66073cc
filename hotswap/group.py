"""Group apply: the ranks of a ``torch.distributed`` process group switch versions as one.

Tensor-parallel ranks each hold a slice of every weight; if one runs v7 while
another runs v6, their partial products are summed into garbage. So each rank
stages and validates versions on its own (manual mode keeps up to
``runstate.KEEP_PENDING`` of them), and at a step boundary every rank calls
``agent.apply_pending(group=pg)``, which runs this protocol:

1. **Offer** (one ``all_gather`` of a fixed-size buffer, on the group's own
   backend): each rank's pending versions as (lineage, version, manifest
   digest), the one it is staging, its own refusals of versions at least as
   new as what it runs (with the reason), what it runs, its agent id and its
   last error.
2. **Decide** (``decide``, pure): every rank computes the same decision from
   the same gathered offers. A version any rank refused is refused by all, as
   ``"rank R: reason"``; of the versions every rank holds, the newest in rank
   0's order is chosen (none: nothing changes anywhere). Each rank keeps the
   version every other rank stages, and the newest it holds, beyond its bound
   until the next step (``needed``), so a fast publisher cannot push a slow
   rank's version out of the others' hands before it is ready.
3. **Apply**: each rank copies the chosen version in under its writer lock
   and runs its probes there (a failed probe puts its bytes back at once).
4. **Settle** (a second ``all_gather``): each rank's outcome. If any rank
   failed, every rank that applied reverts from host memory, and all refuse
   the version with the failing rank's reason; else every rank reports it
   applied. ``apply_pending`` returns the same on every rank.

A collective that fails (a rank died: the group's own timeout applies) before
step 3 changes nothing and raises ``GroupError``; during step 4, each rank
that applied reverts before raising. No rank ever applies alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import msgpack
import torch
import torch.distributed as dist

from hotswap import callbacks, validate
from hotswap.errors import ConfigError, HotswapError
from hotswap.pipeline import Pipeline
from hotswap.runstate import Ready, Rejection

log = logging.getLogger("hotswap.agent")

Key = tuple[str, int, str]
"""(lineage, version, manifest digest): what names one version, for every rank alike."""

# Bytes of one rank's offer on the wire: a fixed size, so one all_gather carries it
# on any backend. Bounded content keeps it within: a few pending versions, the
# refusals below, and reasons cut to ``MAX_REASON``.
OFFER_BYTES = 8192
MAX_REFUSALS = 8
MAX_REASON = 300
# The subject of a refusal a rank records because another rank refused.
GROUP = "<group>"


class GroupError(HotswapError):
    """A collective of the group failed (a rank died or timed out): nothing was applied."""


@dataclass(frozen=True)
class Offer:
    """What one rank holds at the step: see the module docstring."""

    agent_id: str
    pending: list[Key]
    refused: list[tuple[Key, str]]
    running: Key | None
    error: str | None = None
    staging: Key | None = None


@dataclass(frozen=True)
class Decision:
    """The group's decision, the same on every rank: the version to apply (None: none)
    and the versions refused, each with the first refusing rank's reason."""

    chosen: Key | None
    refused: dict[Key, str]


# -- pure steps -------------------------------------------------------------------


def decide(offers: list[Offer]) -> Decision:
    """The newest version every rank holds and none refused, and the refused ones.

    Example:
        >>> a = Offer("a", [("L", 1, "d1"), ("L", 2, "d2")], [], None)
        >>> b = Offer("b", [("L", 1, "d1")], [], None)
        >>> decide([a, b]).chosen
        ('L', 1, 'd1')
        >>> decide([a, Offer("b", [("L", 1, "d1")], [(("L", 2, "d2"), "nan")], None)]).refused
        {('L', 2, 'd2'): 'rank 1: nan'}
    """
    refused: dict[Key, str] = {}
    for rank, offer in enumerate(offers):
        for key, reason in offer.refused:
            refused.setdefault(key, f"rank {rank}: {reason}")
    common = set(offers[0].pending) if offers else set()
    for offer in offers[1:]:
        common &= set(offer.pending)
    chosen = next(
        (k for k in reversed(offers[0].pending) if k in common and k not in refused), None
    )
    return Decision(chosen, refused)


def needed(offers: list[Offer], rank: int) -> set[Key]:
    """What ``rank`` keeps pending beyond its bound until the next step: the version each
    other rank stages and the newest it holds, so that a slow rank's version is still
    held here when it is ready (at most ``2 * (world - 1)`` more).

    Example:
        >>> slow = Offer("b", [("L", 1, "d1")], [], None, staging=("L", 5, "d5"))
        >>> sorted(needed([Offer("a", [("L", 6, "d6")], [], None), slow], 0))
        [('L', 1, 'd1'), ('L', 5, 'd5')]
    """
    found: set[Key] = set()
    for r, o in enumerate(offers):
        if r != rank:
            found |= {k for k in (o.staging, o.pending[-1] if o.pending else None) if k}
    return found


def encode_offer(offer: Offer) -> bytes:
    """``offer`` as msgpack, refusals dropped oldest first until it fits ``OFFER_BYTES``."""
    refused = offer.refused[-MAX_REFUSALS:]
    while True:
        data = bytes(
            msgpack.packb(
                {
                    "agent": offer.agent_id,
                    "pending": [list(k) for k in offer.pending],
                    "refused": [[*k, why[:MAX_REASON]] for k, why in refused],
                    "running": None if offer.running is None else list(offer.running),
                    "error": None if offer.error is None else offer.error[:MAX_REASON],
                    "staging": None if offer.staging is None else list(offer.staging),
                },
                use_bin_type=True,
            )
        )
        if len(data) <= OFFER_BYTES or not refused:
            return data
        refused = refused[1:]


def decode_offer(data: bytes) -> Offer:
    """An offer from ``encode_offer``; FormatError-free by construction of the peers, but
    a malformed one raises ``GroupError`` rather than deciding on garbage."""
    try:
        raw: Any = msgpack.unpackb(data, raw=False, max_array_len=64, max_map_len=16)
        return Offer(
            str(raw["agent"]),
            [_key(k) for k in raw["pending"]],
            [(_key(r[:3]), str(r[3])) for r in raw["refused"]],
            None if raw["running"] is None else _key(raw["running"]),
            raw["error"],
            None if raw.get("staging") is None else _key(raw["staging"]),
        )
    except (ValueError, KeyError, TypeError, IndexError, msgpack.UnpackException) as e:
        raise GroupError(f"a rank's offer does not decode ({type(e).__name__}: {e})") from e


def _key(raw: Any) -> Key:
    lineage, version, digest = raw
    if not (isinstance(lineage, str) and type(version) is int and isinstance(digest, str)):
        raise TypeError(f"not a (lineage, version, digest): {raw!r:.80}")
    return (lineage, version, digest)


def _reason(rejection: Rejection) -> str:
    """A refusal's reasons in one line: ``subject: why; ...``."""
    parts = [f"{subject}: {', '.join(whys)}" for subject, whys in rejection.error.reasons.items()]
    return "; ".join(parts)[:MAX_REASON] or str(rejection.error)[:MAX_REASON]


# -- the collectives --------------------------------------------------------------


def gather(data: bytes, group: Any) -> list[bytes]:
    """Every rank's ``data`` (at most ``OFFER_BYTES``), by rank: one ``all_gather`` of a
    fixed-size uint8 tensor with a length prefix, on the group's device (CUDA for NCCL).

    Raises:
        GroupError: the collective failed (a rank died, the group's timeout ran out).
    """
    if len(data) > OFFER_BYTES - 4:
        raise ConfigError(f"group message of {len(data)} bytes over {OFFER_BYTES - 4}")
    device = torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    buf = torch.zeros(OFFER_BYTES, dtype=torch.uint8)
    buf[:4] = torch.tensor(list(len(data).to_bytes(4, "little")), dtype=torch.uint8)
    if data:
        buf[4 : 4 + len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    mine = buf.to(device)
    outs = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    try:
        dist.all_gather(outs, mine, group=group)
    except Exception as e:  # gloo and NCCL raise RuntimeError subclasses (DistBackendError)
        raise GroupError(f"the group's all_gather failed: {type(e).__name__}: {e}") from e
    got = []
    for out in outs:
        raw = bytes(out.cpu().numpy().tobytes())
        n = int.from_bytes(raw[:4], "little")
        got.append(raw[4 : 4 + n])
    return got


# -- the protocol, on each rank ---------------------------------------------------


def offer_of(pipeline: Pipeline) -> Offer:
    """What this rank holds now (call with the pending versions held still)."""
    state = pipeline.state
    running = state.running()
    return Offer(
        pipeline.reporter.status.agent_id,
        state.pending(),
        [((lineage, v, d), _reason(r)) for lineage, v, d, r in state.local_rejections()],
        None
        if running.version is None or running.lineage is None or running.digest is None
        else (running.lineage, running.version, running.digest),
        pipeline.reporter.status.last_error,
        state.staging(),
    )


def apply_newest(pipeline: Pipeline) -> int | None:
    """``Agent.apply_pending()`` without a group: the newest pending version, here alone.

    Returns:
        The version applied (or refused by a probe), or None when none was pending.
    """
    state = pipeline.state
    if state.begin_apply_pending():
        return None  # another thread applies the pending versions now
    try:
        ready, others = state.choose(None)
        for staged in others:
            staged.release()
        if ready is None:
            return None
        try:
            pipeline.apply(ready)
        finally:
            ready.staged.release()
    finally:
        state.end_apply_pending()
    return ready.staged.plan.manifest.version


def apply_pending(pipeline: Pipeline, group: Any) -> int | None:
    """``Agent.apply_pending(group=...)``: see the module docstring.

    Returns:
        The version the whole group applied, or None (the same on every rank).

    Raises:
        GroupError: a collective failed; this rank applied nothing (or reverted it).
        ConfigError: the agent is in auto mode, or has probations (they would revert
            one rank alone), or another thread is in ``apply_pending()`` already.
    """
    if pipeline.mode != "manual":
        raise ConfigError(
            f"model {pipeline.model_name!r}: a group apply needs Agent(mode='manual'); "
            "in auto mode each rank applies on its own"
        )
    if pipeline.probations.probations:
        raise ConfigError(
            f"model {pipeline.model_name!r}: a Probation reverts one rank alone; "
            "a group apply takes immediate probes only"
        )
    state = pipeline.state
    if state.begin_apply_pending():
        raise ConfigError(
            f"model {pipeline.model_name!r}: apply_pending() is under way on another thread; "
            "every rank must call it once per step"
        )
    try:
        offers = [decode_offer(d) for d in gather(encode_offer(offer_of(pipeline)), group)]
        rank = dist.get_rank(group)
        pipeline.reporter.update(group=offers[0].agent_id, rank=rank, world=len(offers))
        decision = decide(offers)
        state.protect(needed(offers, rank))
        for key, why in decision.refused.items():
            refuse(pipeline, key, why)
        if decision.chosen is None:
            return None
        ready, others = state.choose(decision.chosen[2])
        for staged in others:
            staged.release()
        try:
            return _apply_together(pipeline, group, ready, decision.chosen)
        finally:
            if ready is not None:
                ready.staged.release()
    finally:
        state.end_apply_pending()


def _apply_together(pipeline: Pipeline, group: Any, ready: Ready | None, key: Key) -> int | None:
    """Steps 3 and 4: apply here, gather every rank's outcome, keep or put back."""
    applied, failed = False, None
    written = None
    if ready is None:
        failed = "its pending version was dropped (the agent stopped?)"
    else:
        pipeline.reporter.update(state="applying")
        try:
            written = pipeline.writer.apply(ready.staged, ready.digest)
        except Exception as e:
            failed = f"apply failed: {type(e).__name__}: {e}"
        else:
            failed, applied = written.refused, written.refused is None
    try:
        outcomes = gather(b"" if failed is None else failed.encode(), group)
    except GroupError as e:
        if applied:
            _put_back(pipeline, key, f"the group could not settle it: {e}")
        raise
    failures = [f"rank {r}: {o.decode(errors='replace')}" for r, o in enumerate(outcomes) if o]
    if not failures:
        assert ready is not None and written is not None
        pipeline.settle(ready, written)
        return key[1]
    if applied:
        _put_back(pipeline, key, failures[0])
    else:
        refuse(pipeline, key, failures[0])
    return None


def _put_back(pipeline: Pipeline, key: Key, why: str) -> None:
    """Revert the version this rank applied (another rank failed it), refused for ``why``."""
    done = pipeline.writer.revert(why, only=key[2])
    if done is not None:
        pipeline.reverted(*done)
    pipeline.state.decided()


def refuse(pipeline: Pipeline, key: Key, why: str) -> None:
    """Refuse ``key`` here because the group did (another rank's reason), unless it is
    refused here already; a pending copy of it is dropped."""
    lineage, version, digest = key
    state = pipeline.state
    before = state.rejection(version)
    if before is not None and before.digest == digest:
        return
    dropped = state.drop_pending(digest)
    if dropped is not None:
        dropped.release()
    error = validate.rejection(pipeline.model_name, version, {GROUP: [why]})
    pipeline.reporter.rejected(version, error, 0, state.has_pending(), log)
    callbacks.call(pipeline.on_rejected, version, error.reasons)
    state.record_rejection(version, Rejection(lineage, error, digest, shared=True))


def revert(pipeline: Pipeline, group: Any) -> int | None:
    """``Agent.revert(group=...)``: every rank reverts the same last version, or none does.

    Raises:
        HotswapError: a rank has nothing to revert, or ranks last applied different
            versions (then no rank reverts); GroupError: the collective failed.
    """
    last = pipeline.state.undo()
    mine = None if last is None else [last.lineage, last.version, last.manifest_digest]
    said = gather(bytes(msgpack.packb(mine, use_bin_type=True)), group)
    lasts = [msgpack.unpackb(d, raw=False, max_array_len=4) for d in said]
    for r, other in enumerate(lasts):
        if other is None:
            raise HotswapError(
                f"model {pipeline.model_name!r}: rank {r} has nothing to revert; "
                "no rank of the group reverted"
            )
    if any(other != lasts[0] for other in lasts):
        raise HotswapError(
            f"model {pipeline.model_name!r}: the ranks last applied different versions "
            f"({', '.join(f'rank {r}: v{o[1]}' for r, o in enumerate(lasts))}); "
            "no rank of the group reverted"
        )
    assert last is not None
    done = pipeline.writer.revert(
        "by Agent.revert(group=...), from host memory", only=last.manifest_digest
    )
    if done is None:  # an apply came between the gather and here: not on the serving thread
        raise HotswapError(f"model {pipeline.model_name!r}: an apply raced the group revert")
    return pipeline.reverted(*done)
