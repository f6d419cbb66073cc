"""Versions that are not head (issue 17): ``publish(promote=False)``, ``promote``,
``hotswap publish --no-promote`` and ``hotswap promote``, against the test Redis.

An unpromoted version is stored, numbered and logged, but head, the signed
head record and the notice are left alone: agents never apply it until it is
promoted, and a publish or rollback since supersedes it.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from agent_support import until
from pydantic import SecretStr
from safetensors.torch import save_file

from hotswap import codec, headrecord, keys
from hotswap import notice as nt
from hotswap.agent import Agent
from hotswap.embedded import EmbeddedRedis
from hotswap.errors import NotFound, VersionConflict
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher import cli, history
from publisher.promote import HeadChain
from publisher.publisher import Publisher

KEY = "promote-test-signing-key-0123456789"


class Net(torch.nn.Module):
    """A 256 KiB weight (four 64 KiB chunks: deltas pay) and a bias."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.nn.Parameter(torch.randn(256, 256, generator=g))
        self.b = torch.nn.Parameter(torch.randn(256, generator=g))


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in Net(seed).state_dict().items()}


def stepped(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A sparse step: a few elements of each tensor change (stored as deltas)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in sd.items():
        flat = t.clone().view(-1)
        at = torch.randint(0, flat.numel(), (5,), generator=g)
        flat[at] += 1.0
        out[name] = flat.view(t.shape)
    return out


def runs(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> bool:
    live = model.state_dict()
    return all(bytes(codec.as_bytes(live[k])) == bytes(codec.as_bytes(t)) for k, t in sd.items())


def signed(settings: HotswapSettings) -> HotswapSettings:
    return settings.model_copy(update={"signing_keys": [SecretStr(KEY)]})


@pytest.fixture
def pub(settings: HotswapSettings, client: redis.Redis) -> Iterator[Publisher]:
    p = Publisher("m", settings=settings, connection=client)
    yield p
    p.close()


def record_of(client: redis.Redis) -> bytes | None:
    return client.get(keys.head_record_key("hotswap", "m"))  # type: ignore[return-value]


def kind_drawn(row: dict[str, str]) -> str:
    """The "kind" cell ``hotswap log`` draws for ``row``."""
    return str(next(iter(history.log_table("m", [row]).columns[1].cells)))


class Listening:
    """A subscription made before the publishes under test, read after them."""

    def __init__(self, store: Store) -> None:
        self.sub = store.subscribe()

    def until(self, version: int, attempts: int = 50) -> list[int]:
        """The versions of the notices heard, up to ``version``'s; fails after
        ``attempts`` waits of a second each with no notice of it."""
        heard: list[int] = []
        for _ in range(attempts):
            raw = self.sub.get(timeout=1.0)
            if raw is None:
                continue
            heard.append(nt.decode(raw).version)
            if heard[-1] == version:
                return heard
        raise AssertionError(f"no notice of v{version}; heard {heard}")

    def close(self) -> None:
        self.sub.close()


# -- publish(promote=False) ----------------------------------------------------------


def test_a_version_not_promoted_leaves_head_record_and_notice_alone(
    settings: HotswapSettings, client: redis.Redis, store: Store
) -> None:
    with Publisher("m", settings=signed(settings), connection=client) as pub:
        v1 = pub.publish(state(0), message="one")
        record = record_of(client)
        listening = Listening(store)
        try:
            v2 = pub.publish(stepped(state(0), 1), message="canary", promote=False)
            assert store.head() == v1 and record_of(client) == record
            assert store.versions() == [v1, v2]
            assert store.manifest(v2).parent == v1
            # A later, promoted publish is announced; v2 never was (pub/sub keeps order).
            v3 = pub.publish(stepped(state(0), 2), message="three")
            assert listening.until(v3) == [v3]
        finally:
            listening.close()
    assert store.head() == v3 and store.manifest(v3).parent == v1
    rows = {int(r["version"]): r for r in store.log() if r.get("version")}
    assert rows[v2]["promoted"] == "0" and rows[v3]["promoted"] == "1"
    assert rows[v2]["parent"] == str(v1) == rows[v3]["parent"]
    assert history.log_data([rows[v2]])[0]["promoted"] == 0
    assert kind_drawn(rows[v2]) == "publish (not head)"


def test_the_first_version_may_be_stored_without_becoming_head(
    pub: Publisher, store: Store
) -> None:
    v1 = pub.publish(state(0), promote=False)
    assert store.head() is None and store.versions() == [v1]
    assert pub.promote(v1) == v1 and store.head() == v1
    assert pub.last_promotion is not None and pub.last_promotion.previous is None


# -- promote ---------------------------------------------------------------------------


def test_promote_moves_head_and_an_agent_applies_it_never_before(
    settings: HotswapSettings, pub: Publisher, store: Store
) -> None:
    model = Net(9)
    applied: list[int] = []
    agent = Agent(
        model,
        "m",
        settings=settings.model_copy(update={"poll_interval": 0.05}),
        on_applied=lambda v, _r: applied.append(v),
    )
    sd1 = state(0)
    v1 = pub.publish(sd1)
    with agent:
        assert agent.wait_for(v1, 10)
        sd2 = stepped(sd1, 1)
        v2 = pub.publish(sd2, promote=False)
        # The agent takes several steps (polls of head) while v2 is stored: it
        # stays on v1. ``until`` asks again after every step.
        steps = itertools.count()
        assert until(agent, lambda: next(steps) >= 4)
        assert agent.applied_version == v1 and runs(model, sd1)
        assert pub.promote(v2, message="canary passed") == v2
        assert agent.wait_for(v2, 10)
        assert runs(model, sd2)
    assert applied == [v1, v2]
    assert store.head() == v2
    assert pub.last_promotion is not None and pub.last_promotion.moved
    assert pub.last_promotion.previous == v1
    row = store.log(1)[0]
    assert (row["kind"], row["version"], row["parent"], row["message"]) == (
        "promote",
        str(v2),
        str(v1),
        "canary passed",
    )
    assert kind_drawn(row) == f"promoted to head (was v{v1})"


def test_promote_sends_the_notice_a_commit_sends(pub: Publisher, store: Store) -> None:
    pub.publish(state(0))
    v2 = pub.publish(stepped(state(0), 1), promote=False)
    listening = Listening(store)
    try:
        pub.promote(v2)
        (raw,) = [listening.sub.get(timeout=5.0)]
    finally:
        listening.close()
    assert raw is not None
    notice = nt.decode(raw)
    m = store.manifest(v2)
    assert (notice.model, notice.version, notice.kind, notice.lineage) == (
        "m",
        v2,
        "publish",
        m.lineage,
    )
    assert notice.manifest == store.manifest_bytes(v2)


def test_promote_is_refused_once_head_moved_and_changes_nothing(
    pub: Publisher, store: Store, client: redis.Redis
) -> None:
    v1 = pub.publish(state(0))
    v2 = pub.publish(stepped(state(0), 1), promote=False)
    v3 = pub.publish(stepped(state(0), 2))
    before = (store.head(), record_of(client), len(store.log()))
    with pytest.raises(VersionConflict) as e:
        pub.promote(v2)
    assert str(e.value) == (
        f"model 'm': cannot promote v{v2}: head is v{v3}, not v{v1} that v{v2} was "
        "published on top of; a newer publish or a rollback moved head, so "
        f"v{v2} is superseded: publish its weights again on top of v{v3}"
    )
    assert (store.head(), record_of(client), len(store.log())) == before
    # A rollback moves head too.
    v4 = pub.publish(stepped(state(0), 3), promote=False)
    v5 = pub.rollback(to=v1)
    with pytest.raises(VersionConflict, match=f"head is v{v5}, not v{v3} that v{v4}"):
        pub.promote(v4)
    assert store.head() == v5


def test_promote_of_an_unknown_version_says_so(pub: Publisher, store: Store) -> None:
    v1 = pub.publish(state(0))
    with pytest.raises(NotFound) as e:
        pub.promote(v1 + 5)
    assert str(e.value) == f"model 'm' has no version {v1 + 5} (unknown or collected)"
    assert store.head() == v1


def test_promote_is_idempotent(pub: Publisher, store: Store) -> None:
    pub.publish(state(0))
    v2 = pub.publish(stepped(state(0), 1), promote=False)
    assert pub.promote(v2) == v2
    entries = len(store.log())
    # A rollout killed after its promote and run again finds the work done.
    assert pub.promote(v2) == v2
    assert pub.last_promotion is not None and not pub.last_promotion.moved
    assert store.head() == v2 and len(store.log()) == entries


def test_a_signed_promote_is_applied_by_an_agent_with_the_keys(
    settings: HotswapSettings, client: redis.Redis, store: Store
) -> None:
    keyed = signed(settings)
    model = Net(9)
    sd1 = state(0)
    with Publisher("m", settings=keyed, connection=client) as pub:
        v1 = pub.publish(sd1)
        with Agent(model, "m", settings=keyed) as agent:
            assert agent.wait_for(v1, 10)
            sd2 = stepped(sd1, 1)
            v2 = pub.publish(sd2, promote=False)
            # A re-sign of v1 after v2 was made: the promoted record must be newer.
            resigned = pub.resign()
            assert resigned.issued > store.manifest(v2).created
            pub.promote(v2)
            assert agent.wait_for(v2, 10)
            assert runs(model, sd2)
    raw = record_of(client)
    assert raw is not None
    record = headrecord.decode(raw, keys=[KEY.encode()], expect_model="m")
    assert record.version == v2 and record.manifest == codec.digest(store.manifest_bytes(v2))
    assert record.issued > resigned.issued


# -- what else must not take the newest version for head ------------------------------


def test_a_delta_publish_after_an_unpromoted_version_is_exact_at_an_agent(
    settings: HotswapSettings, pub: Publisher, store: Store
) -> None:
    model = Net(9)
    sd1 = state(0)
    v1 = pub.publish(sd1)
    sd2, sd3 = stepped(sd1, 1), stepped(sd1, 2)
    with Agent(model, "m", settings=settings.model_copy(update={"poll_interval": 30.0})) as a:
        assert a.wait_for(v1, 10)
        v2 = pub.publish(sd2, promote=False)
        # The publisher holds v2's bytes; v3's deltas are from head's (v1's) content.
        v3 = pub.publish(sd3)
        m1, m3 = store.manifest(v1).by_name(), store.manifest(v3).by_name()
        for name, entry in m3.items():
            assert entry.delta is not None, name
            assert entry.delta.base == m1[name].digest
        assert pub.last_report.bases == {"redis": 2}
        assert a.wait_for(v3, 10)
        assert a.applied_version == v3 and runs(model, sd3)
        # And on top of a promoted version, from memory.
        sd4 = stepped(sd3, 3)
        v4 = pub.publish(sd4, promote=False)
        pub.promote(v4)
        sd5 = stepped(sd4, 4)
        v5 = pub.publish(sd5)
        assert pub.last_report.bases == {"memory": 2}
        assert a.wait_for(v5, 10) and runs(model, sd5)
    assert v2 not in (v1, v3)


def test_gc_keeps_an_unpromoted_version_until_it_is_old(pub: Publisher, store: Store) -> None:
    v1 = pub.publish(state(0))
    v2 = pub.publish(stepped(state(0), 1), promote=False)
    assert pub.gc(keep=1).kept == [v1, v2]  # head, and the newest
    v3 = pub.publish(stepped(state(0), 2))
    v4 = pub.publish(stepped(state(0), 3))
    report = pub.gc(keep=2)
    assert report.kept == [v3, v4] and v2 in report.deleted_versions
    with pytest.raises(NotFound):
        pub.promote(v2)


def test_rollback_passes_over_a_version_that_never_was_head(pub: Publisher, store: Store) -> None:
    v1 = pub.publish(state(0))
    v2 = pub.publish(stepped(state(0), 1))
    v3 = pub.publish(stepped(state(0), 2), promote=False)
    v4 = pub.publish(stepped(state(0), 3))
    assert store.manifest(v4).parent == v2
    v5 = pub.rollback()
    assert pub.last_report.rollback_to == v2
    assert pub.last_report.skipped == {v3: "never head (published without promotion)"}
    assert store.head() == v5 and v1 < v2


def test_head_chain_knows_what_was_head_and_says_when_it_cannot_tell(
    pub: Publisher, store: Store
) -> None:
    v1 = pub.publish(state(0))
    v2 = pub.publish(stepped(state(0), 1), promote=False)
    v3 = pub.publish(stepped(state(0), 2))
    v4 = pub.publish(stepped(state(0), 3), promote=False)
    pub.promote(v4)
    chain = HeadChain(store, store.head_manifest())
    assert [chain.never_head(v) for v in (v4, v3, v2, v1)] == [False, False, True, False]
    # v3's manifest collected: below it, nothing can be told.
    store.delete_manifests([v3])
    chain = HeadChain(store, store.head_manifest())
    assert [chain.never_head(v) for v in (v4, v2, v1)] == [False, False, False]
    assert not HeadChain(store, None).never_head(v2)


# -- the command line ------------------------------------------------------------------


@pytest.fixture
def run(
    server: EmbeddedRedis,
    client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Iterator[Any]:
    """``run(*args) -> (code, stdout, stderr)`` in-process, against the test Redis."""
    for k in [k for k in os.environ if k.startswith("HOTSWAP_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("HOTSWAP_REDIS_URL", server.url)
    monkeypatch.setenv("HOTSWAP_CHUNK_BYTES", str(64 * 1024))
    monkeypatch.setenv("HOTSWAP_RETRY_ATTEMPTS", "2")
    monkeypatch.setenv("HOTSWAP_RETRY_MAX_WAIT", "0.1")
    monkeypatch.setenv("HOTSWAP_CONNECT_TIMEOUT", "1")
    monkeypatch.chdir("/")

    def call(*args: str) -> tuple[int, str, str]:
        code = cli.main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    yield call


def test_cli_publish_no_promote_then_promote(run: Any, store: Store, tmp_path: Path) -> None:
    for seed in (0, 1, 2):
        save_file(
            stepped(state(0), seed) if seed else state(0), str(tmp_path / f"{seed}.safetensors")
        )
    assert run("publish", "m", str(tmp_path / "0.safetensors"))[0] == 0
    code, out, err = run("publish", "m", str(tmp_path / "1.safetensors"), "--no-promote")
    assert (code, err) == (0, "")
    assert out.startswith("model m: published v2: ")
    assert out.rstrip().endswith("; not head: agents stay on v1 until `hotswap promote m 2`")
    assert store.head() == 1
    code, out, err = run("promote", "m", "2", "-m", "canary passed")
    assert (code, out, err) == (0, "model m: promoted v2 to head (was v1); agents apply it\n", "")
    assert store.head() == 2
    assert run("promote", "m", "2") == (
        0,
        "model m: v2 is already head; nothing changed\n",
        "",
    )
    code, out, _ = run("--json", "publish", "m", str(tmp_path / "2.safetensors"), "--no-promote")
    assert code == 0 and '"promoted": false' in out
    code, out, _ = run("log", "m", "-n", "1")
    assert code == 0 and "publish (not head)" in out


def test_cli_promote_exit_codes(run: Any, store: Store, tmp_path: Path) -> None:
    for seed in (0, 1, 2):
        save_file(
            stepped(state(0), seed) if seed else state(0), str(tmp_path / f"{seed}.safetensors")
        )
    run("publish", "m", str(tmp_path / "0.safetensors"))
    run("publish", "m", str(tmp_path / "1.safetensors"), "--no-promote")
    run("publish", "m", str(tmp_path / "2.safetensors"))
    code, out, err = run("promote", "m", "2")
    assert (code, out) == (1, "")
    assert err == (
        "hotswap: error: model 'm': cannot promote v2: head is v3, not v1 that v2 was "
        "published on top of; a newer publish or a rollback moved head, so v2 is "
        "superseded: publish its weights again on top of v3\n"
    )
    assert store.head() == 3
    code, _, err = run("publish", "m", str(tmp_path / "2.safetensors"), "--no-promote", "--wait")
    assert code == 2 and "not allowed with argument" in err
    code, _, err = run("--redis-url", "redis://127.0.0.1:1/0", "promote", "m", "2")
    assert code == 3 and err.startswith("hotswap: error: ")
    assert store.head() == 3
