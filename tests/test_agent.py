"""The agent against a real Redis: apply in place, reject whole versions, manual mode."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

import msgpack
import prometheus_client
import pydantic
import pytest
import redis
import torch
from agent_support import (
    MODEL,
    Ten,
    Watch,
    bump,
    cloned,
    commit_raw,
    equal_state,
    pointers,
    restate,
    snapshot,
    status_of,
    until,
)
from waiting import poll

from hotswap import codec, keys
from hotswap.agent import Agent, ApplyReport
from hotswap.errors import ConfigError, ValidationError
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from hotswap.validate import Override, Policy
from publisher.publisher import Publisher

Make = Callable[..., Agent]


@pytest.fixture
def pub(settings: HotswapSettings, client: redis.Redis) -> Iterator[Publisher]:
    p = Publisher(MODEL, settings=settings, connection=client)
    yield p
    p.close()


@pytest.fixture
def make(settings: HotswapSettings) -> Iterator[Make]:
    """Agents built from settings (their own client, watched), stopped after the test."""
    agents: list[Agent] = []

    def build(model: Any, start: bool = True, **kwargs: Any) -> Agent:
        kwargs.setdefault("settings", settings)
        kwargs.setdefault("store_factory", Watch().factory)
        agent = Agent(model, MODEL, **kwargs)
        agents.append(agent)
        return agent.start() if start else agent

    yield build
    for agent in agents:
        agent.stop()


def test_applies_in_place_and_reports(make: Make, pub: Publisher, store: Store) -> None:
    model = Ten()
    where = pointers(model)
    params = list(model.parameters())
    reports: list[tuple[int, ApplyReport]] = []
    agent = make(model, on_applied=lambda v, r: reports.append((v, r)))
    new = bump(model.state_dict())
    new["scale"] = model.scale.clone()  # unchanged: never fetched
    v = pub.publish(new)
    assert agent.wait_for(v, 10)
    assert agent.applied_version == v and agent.head_version == v
    assert equal_state(model, new)
    assert pointers(model) == where
    assert all(a is b for a, b in zip(model.parameters(), params, strict=True))
    assert all(p.requires_grad for p in model.parameters())
    changed = sum(t.nbytes for k, t in new.items() if k != "scale")
    assert [(rv, r.tensors_changed, r.bytes_fetched) for rv, r in reports] == [(v, 9, changed)]
    s = status_of(store, agent, lambda s: s.version == v)
    assert (s.state, s.lineage, s.applied_count, s.bytes_fetched) == (
        "idle",
        store.manifest(v).lineage,
        1,
        changed,
    )
    assert s.last_error is None and s.rejected_version is None
    assert [alive for i, _, alive in store.agent_records() if i == agent.agent_id] == [True]


def test_model_already_at_head_fetches_nothing(make: Make, pub: Publisher) -> None:
    model = Ten()
    v = pub.publish(cloned(model))
    reports: list[ApplyReport] = []
    agent = make(model, on_applied=lambda v, r: reports.append(r))
    assert agent.wait_for(v, 10)
    assert [(r.tensors_changed, r.bytes_fetched) for r in reports] == [(0, 0)]
    # The first real update is not skipped, and fetches only what changed.
    new = cloned(model)
    new["layers.1.bias"] += 1
    v2 = pub.publish(new)
    assert agent.wait_for(v2, 10)
    assert equal_state(model, new)
    assert (reports[-1].tensors_changed, reports[-1].bytes_fetched) == (1, 16 * 4)


def test_agent_accepts_a_plain_mapping_and_a_given_connection(
    settings: HotswapSettings, client: redis.Redis, pub: Publisher
) -> None:
    live = {"w": torch.zeros(4), "b": torch.ones(2)}
    ptr = live["w"].data_ptr()
    new = {"w": torch.arange(4.0), "b": torch.full((2,), 2.0)}
    with Agent(live, MODEL, settings=settings, connection=client) as agent:
        assert agent.wait_for(pub.publish(new), 10)
    assert torch.equal(live["w"], new["w"]) and live["w"].data_ptr() == ptr
    assert agent.state == "stopped"


# -- rejections -------------------------------------------------------------------


def _nan(state: dict[str, torch.Tensor]) -> str:
    state["layers.2.weight"][3, 3] = float("nan")
    return "layers.2.weight"


def _shape(state: dict[str, torch.Tensor]) -> str:
    state["head.weight"] = torch.randn(3, 16)
    return "head.weight"


def _dtype(state: dict[str, torch.Tensor]) -> str:
    state["layers.0.bias"] = state["layers.0.bias"].double()
    return "layers.0.bias"


def _ratio(state: dict[str, torch.Tensor]) -> str:
    state["layers.1.weight"] = state["layers.1.weight"] * 100
    return "layers.1.weight"


def _unknown(state: dict[str, torch.Tensor]) -> str:
    state["extra.weight"] = torch.ones(3)
    return "extra.weight"


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (_nan, "1 of 256 values are not finite (NaN or inf)"),
        (_shape, "shape [3, 16] differs from the live tensor's [2, 16]"),
        (_dtype, "dtype F64 differs from the live tensor's F32"),
        (_ratio, "norm ratio new/old 100.094 is outside [0.1, 10] (norm 17.806 -> "),
        (_unknown, "unknown tensor: the live model has no tensor of this name"),
    ],
    ids=["nan", "shape", "dtype", "ratio-100x", "unknown-name"],
)
def test_bad_version_is_rejected_whole_and_reported(
    make: Make, pub: Publisher, store: Store, spoil: Callable[..., str], reason: str
) -> None:
    model = Ten()
    v1 = pub.publish(cloned(model))
    bad = bump(model.state_dict())
    tensor = spoil(bad)
    v2 = pub.publish(bad, force=True)  # force: past the publisher's own check of head
    before = snapshot(model)
    refused: list[tuple[int, dict[str, list[str]]]] = []
    agent = make(model, on_rejected=lambda v, r: refused.append((v, r)))
    with pytest.raises(ValidationError) as e:
        agent.wait_for(v2, 10)
    assert list(e.value.reasons) == [tensor] and len(e.value.reasons[tensor]) == 1
    assert e.value.reasons[tensor][0].startswith(reason)
    assert str(e.value).startswith(
        f"model 'm' v{v2} rejected, 1 tensor(s) failed validation: '{tensor}': {reason}"
    )
    assert snapshot(model) == before
    assert agent.applied_version is None and v1 < v2
    assert refused == [(v2, e.value.reasons)]
    assert agent.last_rejection is not None and agent.last_rejection.reasons == e.value.reasons
    s = status_of(store, agent)
    assert (s.rejected_version, s.rejection, s.rejected_count) == (v2, e.value.reasons, 1)
    assert s.last_error is not None and f"'{tensor}': {reason}" in s.last_error
    # Not fetched again on every poll, and the next good version still applies.
    fixed = bump(model.state_dict(), 0.02)
    # v2's extra tensor (the unknown-name case) is left out on purpose.
    v3 = pub.publish(fixed, exclude=["extra.*"], force=True)  # v2 (forced) is head
    assert agent.wait_for(v3, 10)
    assert equal_state(model, fixed) and status_of(store, agent).rejected_count == 1


def test_every_failing_tensor_is_named(make: Make, pub: Publisher) -> None:
    model = Ten()
    bad = bump(model.state_dict())
    for spoil in (_nan, _shape, _ratio):
        spoil(bad)
    v = pub.publish(bad)
    before = snapshot(model)
    agent = make(model)
    with pytest.raises(ValidationError) as e:
        agent.wait_for(v, 10)
    assert sorted(e.value.reasons) == ["head.weight", "layers.1.weight", "layers.2.weight"]
    assert snapshot(model) == before


def test_blob_corrupted_after_commit_is_rejected(
    make: Make, pub: Publisher, store: Store, client: redis.Redis
) -> None:
    model = Ten()
    new = bump(model.state_dict())
    v = pub.publish(new)
    e = store.manifest(v).by_name()["layers.3.weight"]
    key = keys.blob_key("hotswap", MODEL, e.digest, e.chunk_bytes, 0)
    raw = bytearray(cast(bytes, client.get(key)))
    raw[100] ^= 0x01
    client.set(key, bytes(raw))
    before = snapshot(model)
    agent = make(model)
    with pytest.raises(ValidationError) as err:
        agent.wait_for(v, 10)
    assert list(err.value.reasons) == ["layers.3.weight"]
    why = err.value.reasons["layers.3.weight"][0]
    assert why.startswith(f"model 'm' v{v} tensor 'layers.3.weight': bytes hash to ")
    assert "corrupted in Redis or in transit" in why
    assert snapshot(model) == before
    assert status_of(store, agent).rejection == err.value.reasons


def test_stated_norm_that_lies_is_rejected(make: Make, store: Store) -> None:
    model = Ten()
    new = bump(model.state_dict())
    v = commit_raw(
        store,
        new,
        tamper=lambda es: restate(es, "layers.0.weight", norm=123.0),
    )
    before = snapshot(model)
    agent = make(model)
    with pytest.raises(ValidationError) as e:
        agent.wait_for(v, 10)
    (why,) = e.value.reasons["layers.0.weight"]
    assert why.endswith(
        "differs from the manifest's 123 (the bytes do not match the published statistics)"
    )
    assert snapshot(model) == before


def _tamper_body(client: redis.Redis, version: int) -> None:
    key = keys.manifest_key("hotswap", MODEL, version)
    env = msgpack.unpackb(client.get(key), raw=False)
    body = msgpack.unpackb(env["body"], raw=False)
    body["message"] = "altered"
    env["body"] = msgpack.packb(body, use_bin_type=True)
    client.set(key, msgpack.packb(env, use_bin_type=True))


@pytest.mark.parametrize("how", ["altered", "unsigned"])
def test_bad_signature_is_rejected_when_a_key_is_set(
    make: Make, settings: HotswapSettings, client: redis.Redis, store: Store, how: str
) -> None:
    keyed = settings.model_copy(update={"signing_keys": [pydantic_secret("s3cret")]})
    model = Ten()
    signer = Publisher(MODEL, settings=keyed if how == "altered" else settings, connection=client)
    v = signer.publish(bump(model.state_dict()))
    if how == "altered":
        _tamper_body(client, v)
    before = snapshot(model)
    agent = make(model, settings=keyed)
    with pytest.raises(ValidationError) as e:
        agent.wait_for(v, 10)
    (why,) = e.value.reasons["<manifest>"]
    expected = "has a bad signature" if how == "altered" else "is unsigned"
    assert f"manifest of m v{v} {expected}" in why
    assert snapshot(model) == before
    s = status_of(store, agent)
    assert s.rejected_version == v and expected in s.rejection["<manifest>"][0]


def pydantic_secret(value: str) -> Any:
    from pydantic import SecretStr

    return SecretStr(value)


def test_unknown_names_can_be_ignored_by_policy(make: Make, pub: Publisher) -> None:
    model = Ten()
    new = bump(model.state_dict())
    v = pub.publish({**new, "extra.weight": torch.ones(3)})
    agent = make(model, policy={"unknown_tensors": "ignore"})
    assert agent.wait_for(v, 10)
    assert equal_state(model, new)


def test_policy_override_lets_one_tensor_jump(make: Make, pub: Publisher) -> None:
    model = Ten()
    new = bump(model.state_dict())
    new["layers.1.weight"] = new["layers.1.weight"] * 100
    policy = Policy(overrides={"layers.1.*": Override(norm_ratio=None)})
    agent = make(model, policy=policy)
    assert agent.wait_for(pub.publish(new), 10)
    assert equal_state(model, new)


# -- manual mode, ties, waiting ---------------------------------------------------------


def test_manual_mode_applies_only_the_newest_valid_version_when_asked(
    make: Make, pub: Publisher, store: Store
) -> None:
    model = Ten()
    before = snapshot(model)
    agent = make(model, mode="manual")
    pub.publish(bump(model.state_dict(), 0.01))
    newest = bump(model.state_dict(), 0.02)
    v2 = pub.publish(newest)
    assert until(agent, lambda: agent.pending_version == v2)
    assert agent.state == "pending" and agent.applied_version is None
    bad = bump(model.state_dict(), 0.03)
    _nan(bad)
    v3 = pub.publish(bad)
    with pytest.raises(ValidationError):
        agent.wait_for(v3, 10)
    assert snapshot(model) == before and agent.pending_version == v2
    with agent.reading(), pytest.raises(ConfigError, match=r"apply_pending\(\) was called inside"):
        agent.apply_pending()
    assert agent.apply_pending() == v2
    assert agent.applied_version == v2 and equal_state(model, newest)
    assert agent.apply_pending() is None
    assert status_of(store, agent, lambda s: s.version == v2).version == v2


class TiedLM(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(32, 8)
        self.mid = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, 32, bias=False)
        self.out.weight = self.emb.weight


def test_tied_weights_stay_tied(make: Make, pub: Publisher) -> None:
    model = TiedLM()
    where = pointers(model)
    reports: list[ApplyReport] = []
    agent = make(model, on_applied=lambda v, r: reports.append(r))
    new = bump(model.state_dict())
    new["out.weight"] = new["emb.weight"]
    v = pub.publish(new)
    assert agent.wait_for(v, 10)
    assert model.out.weight is model.emb.weight and pointers(model) == where
    assert equal_state(model, new)
    # Tied bytes travel once: emb (32x8) + mid (8x8 + 8), float32.
    assert reports[-1].bytes_fetched == (32 * 8 + 8 * 8 + 8) * 4
    split = bump(model.state_dict())
    split["out.weight"] = split["emb.weight"] + 1
    before = snapshot(model)
    with pytest.raises(ValidationError) as e:
        agent.wait_for(pub.publish(split), 10)
    assert e.value.reasons == {
        "out.weight": [
            "shares storage with 'emb.weight' in the live model, "
            "but the version gives it different bytes"
        ]
    }
    assert snapshot(model) == before


def test_wait_for_semantics(make: Make, pub: Publisher) -> None:
    model = Ten()
    agent = make(model)
    started = time.monotonic()
    assert agent.wait_for(1, timeout=0.3) is False
    assert time.monotonic() - started >= 0.3
    v1 = pub.publish(bump(model.state_dict(), 0.01))
    v2 = pub.publish(bump(model.state_dict(), 0.02))
    assert agent.wait_for(v2, 10)
    assert agent.wait_for(v1, 0) is True  # superseded by a newer applied version
    assert agent.wait_for(v2 + 1, 0) is False


@pytest.mark.parametrize("staging", ["pinned", "device"])
def test_staging_modes_run_the_same_code_on_cpu(make: Make, pub: Publisher, staging: str) -> None:
    model = Ten()
    where = pointers(model)
    agent = make(model, staging=staging)
    new = bump(model.state_dict())
    assert agent.wait_for(pub.publish(new), 10)
    assert equal_state(model, new) and pointers(model) == where


# -- locking ---------------------------------------------------------------------------


def test_writer_is_not_starved_by_a_steady_stream_of_readers(make: Make, pub: Publisher) -> None:
    model = Ten()
    agent = make(model)
    stop = threading.Event()
    reads = [0] * 4
    counted = threading.Condition()
    started = threading.Barrier(len(reads) + 1)
    batch = torch.randn(256, 16)

    def reader(i: int) -> None:
        started.wait()
        while not stop.is_set():
            with agent.reading(), torch.no_grad():
                model(batch)  # a forward pass, back to back with the other readers'
            with counted:
                reads[i] += 1
                counted.notify_all()

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        started.wait(10)  # every reader runs before the version is published
        new = bump(model.state_dict())
        assert agent.wait_for(pub.publish(new), 10)
        with counted:
            before = sum(reads)
            # Readers carry on after the write.
            assert counted.wait_for(lambda: sum(reads) > before, 10)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert equal_state(model, new) and all(reads)


def test_reading_is_reentrant_while_a_writer_waits(make: Make, pub: Publisher) -> None:
    model = Ten()
    agent = make(model)
    new = bump(model.state_dict())
    entered = threading.Event()

    def other_reader() -> None:
        with agent.reading():
            entered.set()

    with agent.reading():
        v = pub.publish(new)
        assert poll(lambda: _writer_queued(agent))  # nothing announces it: ask
        done = threading.Thread(target=other_reader)
        with agent.reading():  # same thread: must not queue behind the writer
            assert agent.applied_version is None
        done.start()
        assert not entered.wait(0.2)  # another thread does queue behind it
        assert not equal_state(model, new)
    assert agent.wait_for(v, 10)
    assert entered.wait(10)


def _writer_queued(agent: Agent) -> bool:
    """The agent's writer waits for the gate and holds new readers back (readerwriterlock's
    RWLockWrite: the first queued writer counts itself, then takes the readers' entry lock)."""
    rw = agent._gate._rw
    return rw.v_write_count == 1 and rw.c_lock_read_try.locked()


# -- lifecycle, errors, callbacks, metrics -------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model_name": "no spaces"}, "invalid model name 'no spaces'"),
        ({"mode": "eager"}, "agent mode 'eager' is unknown: use 'auto' or 'manual'"),
        ({"staging": "disk"}, "staging 'disk' is unknown: use 'auto', 'pinned' or 'device'"),
        ({"policy": {"norm_ratio": (5, 1)}}, "invalid validation policy: 1 validation error"),
        ({"staging_keep_bytes": -1}, "staging keep_bytes must be >= 0, not -1"),
    ],
)
def test_bad_arguments_are_config_errors(
    settings: HotswapSettings, kwargs: dict[str, Any], message: str
) -> None:
    kwargs = {"model_name": MODEL, "settings": settings, **kwargs}
    with pytest.raises(ConfigError) as e:
        Agent(Ten(), **kwargs)
    assert str(e.value).startswith(message)


def test_bad_environment_is_a_config_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HOTSWAP_CHUNK_BYTES", "100")
    with pytest.raises(ConfigError) as e:
        Agent(Ten(), MODEL)
    assert type(e.value) is ConfigError
    assert isinstance(e.value.__cause__, pydantic.ValidationError)
    assert str(e.value) == (
        "invalid settings: HOTSWAP_CHUNK_BYTES='100': Input should be greater than or equal to 4096"
    )


def test_stop_reports_stopped_and_cannot_restart(make: Make, store: Store) -> None:
    agent = make(Ten())
    assert until(agent, lambda: agent.state == "idle")
    agent.stop()
    assert status_of(store, agent).state == "stopped"
    with pytest.raises(ConfigError, match="was stopped; create a new one"):
        agent.start()


def test_callbacks_that_raise_do_not_stop_the_agent(make: Make, pub: Publisher) -> None:
    def boom(*args: Any) -> None:
        raise RuntimeError("callback bug")

    model = Ten()
    agent = make(model, on_applied=boom, on_rejected=boom)
    bad = bump(model.state_dict())
    _nan(bad)
    with pytest.raises(ValidationError):
        agent.wait_for(pub.publish(bad), 10)
    good = bump(model.state_dict(), 0.02)
    assert agent.wait_for(pub.publish(good), 10)
    assert agent.wait_for(pub.publish(bump(good)), 10)
    assert agent.state == "idle"


def test_metrics_are_recorded_per_model(make: Make, pub: Publisher) -> None:
    def sample(name: str) -> float:
        return prometheus_client.REGISTRY.get_sample_value(name, {"model": MODEL}) or 0.0

    rejections, fetched = sample("hotswap_rejections_total"), sample("hotswap_fetched_bytes_total")
    model = Ten()
    agent = make(model)
    make(Ten(), start=False)  # a second agent in the process registers nothing twice
    new = bump(model.state_dict())
    v = pub.publish(new)
    assert agent.wait_for(v, 10)
    # Gauges are per agent (tests/test_metrics.py has the rest).
    applied = {"model": MODEL, "agent": agent.agent_id}
    assert prometheus_client.REGISTRY.get_sample_value("hotswap_applied_version", applied) == v
    assert sample("hotswap_fetched_bytes_total") - fetched == sum(t.nbytes for t in new.values())
    bad = bump(new)
    _nan(bad)
    with pytest.raises(ValidationError):
        agent.wait_for(pub.publish(bad), 10)
    assert sample("hotswap_rejections_total") - rejections == 1


def test_live_tensors_that_cannot_travel_are_refused_at_once(settings: HotswapSettings) -> None:
    raw = torch.empty(2, dtype=torch.bits8)
    with pytest.raises(ConfigError) as e:
        Agent({"w": torch.ones(2), "q": raw}, MODEL, settings=settings)
    assert str(e.value).startswith(
        "live tensor 'q' cannot be updated: dtype torch.bits8 is not supported"
    )
    with pytest.raises(ConfigError, match="live tensor 'n' is a list, not a tensor"):
        Agent({"n": [1.0]}, MODEL, settings=settings)  # type: ignore[dict-item]


# -- staging memory and known norms ------------------------------------------------------


def _norms_of_live(model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record every codec.norm over a live tensor's memory (validation's pass over the old)."""
    live = {t.data_ptr() for t in model.state_dict().values()}
    calls: list[int] = []
    real = codec.norm

    def norm(t: torch.Tensor) -> float:
        calls.append(int(t.data_ptr() in live))
        return real(t)

    monkeypatch.setattr(codec, "norm", norm)
    return calls


def test_live_norms_come_from_the_manifest_the_model_runs(
    make: Make, pub: Publisher, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = Ten()
    agent = make(model)
    v1 = pub.publish(bump(model.state_dict()))
    assert agent.wait_for(v1, 10)
    calls = _norms_of_live(model, monkeypatch)
    new = bump(model.state_dict())
    assert agent.wait_for(pub.publish(new), 10)
    assert equal_state(model, new)
    # Ten new norms computed, none over the live tensors: their norms were v1's.
    assert calls == [0] * 10


def test_a_norm_the_policy_does_not_check_is_not_trusted_later(make: Make, store: Store) -> None:
    model = Ten()
    policy = Policy(overrides={"layers.0.weight": Override(check_norm=False)})
    agent = make(model, policy=policy)
    v1 = commit_raw(
        store,
        bump(model.state_dict()),
        tamper=lambda es: restate(es, "layers.0.weight", norm=1e6),  # a lie, unchecked
    )
    assert agent.wait_for(v1, 10)
    weight = model.state_dict()["layers.0.weight"]
    true_norm = codec.norm(weight)
    jumped = dict(cloned(model), **{"layers.0.weight": weight * 100})
    before = snapshot(model)
    with pytest.raises(ValidationError) as e:
        agent.wait_for(commit_raw(store, jumped), 10)
    (why,) = e.value.reasons["layers.0.weight"]
    assert f"(norm {true_norm:.6g} -> " in why and "1e+06" not in why
    assert snapshot(model) == before


def test_an_unchanged_tensor_takes_its_norm_from_its_entry(make: Make, store: Store) -> None:
    # The entry's stats describe the very bytes that run (same digest): the
    # ratio of a later version is taken against them, with no pass over the tensor.
    model = Ten()
    agent = make(model)
    v1 = commit_raw(
        store, cloned(model), tamper=lambda es: restate(es, "layers.0.weight", norm=1000.0)
    )
    assert agent.wait_for(v1, 10)
    nudged = dict(
        cloned(model), **{"layers.0.weight": model.state_dict()["layers.0.weight"] * 1.01}
    )
    with pytest.raises(ValidationError) as e:
        agent.wait_for(commit_raw(store, nudged), 10)
    (why,) = e.value.reasons["layers.0.weight"]
    assert why.startswith("norm ratio new/old ") and "(norm 1000 -> " in why


def test_staging_memory_is_kept_between_versions_when_asked(make: Make, pub: Publisher) -> None:
    model = Ten()
    agent = make(model, staging_keep_bytes=1 << 20)
    where = pointers(model)
    for step in (0.01, 0.02, 0.03):
        new = bump(model.state_dict(), step)
        assert agent.wait_for(pub.publish(new), 10)
        assert equal_state(model, new) and pointers(model) == where
        # Handed back just after the apply, once waiters were woken.
        kept = sum(t.nbytes for t in new.values())
        assert until(agent, lambda: agent._memory.kept_bytes >= kept)
    agent.stop()
    assert agent._memory.kept_bytes == 0


def test_manual_mode_with_kept_memory_never_shares_a_pending_arena(
    make: Make, pub: Publisher
) -> None:
    model = Ten()
    agent = make(model, mode="manual", staging_keep_bytes=1 << 20)
    for step in (0.01, 0.02, 0.03):
        good = bump(model.state_dict(), step)
        v1 = pub.publish(good)
        assert until(agent, lambda v=v1: agent.pending_version == v)  # type: ignore[misc]
        bad = bump(model.state_dict(), 2 * step)
        _nan(bad)
        with pytest.raises(ValidationError):  # fetched while v1 waits, then refused
            agent.wait_for(pub.publish(bad), 10)
        assert agent.apply_pending() == v1
        assert equal_state(model, good), step  # v1's staged bytes were left alone
