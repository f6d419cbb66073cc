"""Issue 15, the new user's trial: publish/rollback ``--wait`` report what each live agent did,
a stopped agent is not live, a rejected rollback retracts nothing, a no-op rollback is refused.

Agents are real: in-process ones for most tests, one in a process of its own
(tests/fleet_worker.py). The waits end on the agents' records, never on a clock,
except the one test of the timeout itself.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import test_cli
import torch
from agent_support import MODEL, Ten, bump, cloned
from safetensors.torch import save_file
from waiting import poll

from hotswap import status as st
from hotswap.agent import Agent
from hotswap.errors import ValidationError
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher.publisher import Publisher

env = test_cli.env
run = test_cli.run

NAN_REASON = "layers.2.weight: 1 of 256 values are not finite (NaN or inf)"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def pub(settings: HotswapSettings, client: redis.Redis) -> Iterator[Publisher]:
    p = Publisher(MODEL, settings=settings, connection=client)
    yield p
    p.close()


def agent(model: torch.nn.Module, settings: HotswapSettings, agent_id: str, **kw: Any) -> Agent:
    named = settings.model_copy(update={"agent_id": agent_id})
    return Agent(model, MODEL, settings=named, **kw).start()


def nan(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    bad = {k: v.clone() for k, v in state.items()}
    bad["layers.2.weight"][3, 3] = float("nan")
    return bad


def saved(tmp_path: Path, name: str, state: dict[str, torch.Tensor]) -> str:
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


def without_records(client: redis.Redis) -> dict[Any, Any]:
    """Every key's dump but agents' records and heartbeats (agents write those on their own)."""
    return {
        k: client.dump(k)
        for k in sorted(client.keys("*"))
        if b":agent" not in k and b":heartbeat" not in k
    }


def done_line(out: str, line: str) -> None:
    """The last line is ``line`` followed by the seconds the wait took."""
    assert re.fullmatch(re.escape(line) + r" \(\d+\.\d\ds\)", out.splitlines()[-1]), out


def test_publish_wait_reports_every_live_agent_and_exits_0_when_all_applied(
    settings: HotswapSettings, pub: Publisher, run: Any, tmp_path: Path
) -> None:
    a, b = Ten(), Ten()
    web1, web2 = agent(a, settings, "web-1"), agent(b, settings, "web-2")
    try:
        assert web1.wait_for(pub.publish(cloned(a)), 10) and web2.wait_for(1, 10)
        code, out, err = run("publish", "m", saved(tmp_path, "v2", bump(cloned(a))), "--wait", "30")
        assert (code, err) == (0, "")
        lines = out.splitlines()
        assert lines[0].startswith("model m: published v2: 10 of 10 tensors changed")
        assert lines[1:3] == ["agent web-1: applied v2", "agent web-2: applied v2"]
        done_line(out, "model m: all 2 live agents applied v2")
        code, out, _ = run(
            "publish", "m", saved(tmp_path, "v3", bump(cloned(a), 0.02)), "--wait", "--json"
        )
        fleet = json.loads(out)["fleet"]
        assert code == 0 and (fleet["ok"], fleet["live_agents"], fleet["timed_out"]) == (
            True,
            2,
            False,
        )
        assert fleet["timeout"] == 60 and fleet["problems"] == []
        assert [(v["agent_id"], v["outcome"], v["runs"]) for v in fleet["verdicts"]] == [
            ("web-1", "applied", 3),
            ("web-2", "applied", 3),
        ]
        # Without --wait nobody is asked.
        code, out, _ = run("publish", "m", saved(tmp_path, "v4", bump(cloned(a), 0.03)), "--json")
        assert code == 0 and json.loads(out)["fleet"] is None
    finally:
        web1.stop()
        web2.stop()


def test_a_rollback_every_agent_refuses_exits_4_and_the_next_goes_back_to_what_they_run(
    settings: HotswapSettings, pub: Publisher, store: Store, run: Any, client: redis.Redis
) -> None:
    model = Ten()
    web = agent(model, settings, "web-1")
    try:
        good = cloned(model)
        assert web.wait_for(pub.publish(good), 10)  # v1
        with pytest.raises(ValidationError):
            web.wait_for(pub.publish(nan(bump(good))), 10)  # v2: refused
        assert web.wait_for(pub.publish(bump(good, 0.02)), 10)  # v3
        # The user's mistake: back to the NaN version. Rollback waits by default.
        code, out, err = run("rollback", "m", "--to", "2")
        assert (code, err) == (4, "")
        assert out.splitlines() == [
            out.splitlines()[0],
            f"agent web-1: rejected v4: {NAN_REASON}",
            "model m: not healthy: 1 of 1 live agents did not apply v4 (exit 4)",
        ]
        assert out.startswith("model m: rolled back to v2 as v4 (")
        # v4 (rolled back to v2, refused, running nowhere) retracts nothing: v3 is
        # what the fleet runs, not "retracted by v4".
        code, out, err = run("rollback", "m", "--json")
        assert (code, err) == (0, "")
        data = json.loads(out)
        assert (data["rollback_to"], data["version"], data["skipped"]) == (3, 5, {})
        assert data["fleet"]["ok"] is True
        assert data["fleet"]["verdicts"] == [
            {"agent_id": "web-1", "outcome": "applied", "runs": 5, "reason": None}
        ]
        # --no-wait: committed, nobody asked.
        before = without_records(client)
        code, out, _ = run("rollback", "m", "--to", "1", "--no-wait")
        assert (
            code == 0
            and out.startswith("model m: rolled back to v1 as v6 (")
            and "agent" not in out
        )
        assert without_records(client) != before
    finally:
        web.stop()


def test_the_wait_ends_at_its_timeout_for_an_agent_that_does_not_apply(
    settings: HotswapSettings, pub: Publisher, run: Any, tmp_path: Path
) -> None:
    model = Ten()
    web = agent(model, settings, "web-1", mode="manual")  # holds versions for apply_pending()
    try:
        first = pub.publish(cloned(model))
        assert poll(lambda: web.pending_version == first)
        assert web.apply_pending() == 1
        code, out, err = run(
            "publish", "m", saved(tmp_path, "v2", bump(cloned(model))), "--wait", "3", "--json"
        )
        fleet = json.loads(out)["fleet"]
        assert (code, err) == (4, "")
        assert (fleet["ok"], fleet["timed_out"]) == (False, True)
        assert fleet["problems"] == ["agent web-1: did not apply v2 within 3 s (pending, runs v1)"]
    finally:
        web.stop()


def test_a_rollback_to_what_head_holds_is_refused_and_changes_nothing(
    pub: Publisher, run: Any, client: redis.Redis
) -> None:
    state = cloned(Ten())
    pub.publish(state)
    pub.publish(bump(state))
    assert run("rollback", "m", "--to", "1")[0] == 0  # v3 holds v1's weights
    before = without_records(client)
    code, out, err = run("rollback", "m", "--to", "1")
    assert (code, out) == (1, "")
    assert err == (
        "hotswap: error: model 'm': head v3 already holds v1's weights; nothing to roll back\n"
    )
    assert without_records(client) == before


def test_a_stopped_agent_is_live_nowhere(
    settings: HotswapSettings, pub: Publisher, store: Store, run: Any, tmp_path: Path
) -> None:
    model = Ten()
    web = agent(model, settings, "web-1")
    assert web.wait_for(pub.publish(cloned(model)), 10)
    web.stop()
    # Its heartbeat outlives it by the ttl; its record says it stopped.
    rows = {a: (st.decode(raw).state, alive) for a, raw, alive in store.agent_records()}
    assert rows == {"web-1": ("stopped", True)}
    code, out, _ = run("status", "m", "--json")
    (row,) = json.loads(out)["agents"]
    assert code == 0 and (row["state"], row["alive"]) == ("stopped", False)
    code, out, _ = run("status", "m")
    assert "stopped (" in out and "expired" not in out
    code, out, _ = run("models", "--json")
    assert code == 0 and json.loads(out)[0]["live_agents"] == 0
    code, out, _ = run("publish", "m", saved(tmp_path, "v2", bump(cloned(model))), "--wait", "5")
    assert code == 0
    assert out.splitlines()[-1] == "model m: no live agents: nobody to apply v2 yet"
    code, out, _ = run("delete", "m", "--yes")
    assert code == 0 and out.rstrip().endswith(", 0 live agents))")


def test_an_agent_in_its_own_process_rejects_then_applies_then_stops(
    settings: HotswapSettings,
    pub: Publisher,
    store: Store,
    run: Any,
    env: dict[str, str],
    tmp_path: Path,
) -> None:
    good = cloned(Ten())
    pub.publish(good)  # v1: what the worker's Ten already holds
    worker = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "fleet_worker.py"),
            settings.redis_url,
            "m",
            "proc-1",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None and worker.stdin is not None
        assert worker.stdout.readline() == "READY\n"

        def runs(version: int) -> bool:
            found = {a: st.decode(raw) for a, raw, _ in store.agent_records()}
            return "proc-1" in found and found["proc-1"].version == version

        assert poll(lambda: runs(1))
        # The real command, in a process of its own too: its exit code is the shell's.
        done = test_cli.hotswap(
            env, "publish", "m", saved(tmp_path, "nan", nan(bump(good))), "--wait", "30"
        )
        assert done.returncode == 4, done.stderr
        assert done.stdout.splitlines()[1:] == [
            f"agent proc-1: rejected v2: {NAN_REASON}",
            "model m: not healthy: 1 of 1 live agents did not apply v2 (exit 4)",
        ]
        code, out, _ = run("publish", "m", saved(tmp_path, "v3", bump(good, 0.02)), "--wait", "30")
        assert code == 0 and out.splitlines()[1] == "agent proc-1: applied v3"
        done_line(out, "model m: the live agent applied v3")
        out, err = worker.communicate(timeout=30)  # closes stdin: the worker stops its agent
        assert (worker.returncode, out) == (0, "STOPPED\n"), err
        # Stopped: no agent to wait for, and what it ran no longer steers the rollback.
        code, out, _ = run("rollback", "m")
        assert code == 0
        assert out.splitlines()[1:] == [
            "model m: chose v1, passing over v2: rejected by agent proc-1",
            "model m: no live agents: nobody to apply v4 yet",
        ]
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.communicate()  # reaps it and closes its pipes


# -- output details ------------------------------------------------------------------


def test_a_publish_that_drops_tensors_says_agents_refuse_it(
    pub: Publisher, run: Any, tmp_path: Path
) -> None:
    state = cloned(Ten())
    pub.publish(state)
    code, out, _ = run("publish", "m", saved(tmp_path, "v2", state), "--exclude", "head.*")
    assert code == 0
    assert out.startswith(
        "model m: published v2: 0 of 9 tensors changed, 1 removed: agents refuse a version that "
        "lacks tensors they serve unless their Policy(missing_tensors='keep'), "
    )


def test_non_finite_numbers_are_json_null(pub: Publisher, run: Any) -> None:
    state = cloned(Ten())
    pub.publish(state)
    bad = nan(state)
    bad["head.weight"][0, 0] = float("inf")
    pub.publish(bad)
    code, out, _ = run("show", "m", "--json")
    assert code == 0 and "NaN" not in out and '"nan"' not in out
    row = next(t for t in json.loads(out)["tensors"] if t["name"] == "layers.2.weight")
    assert row["norm"] is None and row["max_abs"] is None
    code, out, _ = run("diff", "m", "1", "2", "--values", "--json")
    assert code == 0 and "Infinity" not in out and '"inf"' not in out
    changed = {c["name"]: c for c in json.loads(out)["changed"]}
    assert changed["layers.2.weight"]["distance"] is None
    assert changed["layers.2.weight"]["norm_change"] is None
    assert changed["head.weight"]["max_abs_change"] is None


def test_log_bases_and_status_reads_as_publish_and_the_table_give_them(
    settings: HotswapSettings, pub: Publisher, store: Store, run: Any
) -> None:
    state = cloned(Ten())
    pub.publish(state)
    pub.publish(bump(state))
    code, out, _ = run("log", "m", "--json")
    bases = json.loads(out)[0]["bases"]
    assert code == 0 and isinstance(bases, dict)
    assert bases == {k: v for k, v in pub.last_report.bases.items() if v}
    s = st.AgentStatus("srv-a", "h", 1, state="idle", version=2, encodings=["xor-zstd"])
    store.write_agent_status("srv-a", st.encode(s), ttl=60)
    code, out, _ = run("status", "m", "--json")
    (row,) = json.loads(out)["agents"]
    assert row["reads"] == ["full", "xor-zstd"] and row["encodings"] == ["xor-zstd"]
    assert "full, xor-zstd" in run("status", "m")[1]


def test_models_with_redis_away_says_listing_models(
    run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOTSWAP_REDIS_URL", "redis://127.0.0.1:1")
    code, out, err = run("models")
    assert (code, out) == (3, "")
    assert err.startswith("hotswap: error: Redis unreachable while listing models (")
    assert "'*'" not in err


def test_bad_wait_options_are_usage_errors_that_change_nothing(
    pub: Publisher, run: Any, client: redis.Redis, tmp_path: Path
) -> None:
    state = cloned(Ten())
    pub.publish(state)
    path = saved(tmp_path, "v2", bump(state))
    before = without_records(client)
    code, out, err = run("publish", "m", path, "--wait", "soon")
    assert (code, out) == (2, "")
    assert err.endswith(
        "hotswap publish: error: argument --wait: seconds must be a number, got 'soon'\n"
    )
    code, out, err = run("rollback", "m", "--wait", "5", "--no-wait")
    assert (code, out) == (2, "")
    assert err.endswith("error: argument --no-wait: not allowed with argument --wait\n")
    assert without_records(client) == before
