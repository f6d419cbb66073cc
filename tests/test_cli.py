"""The ``hotswap`` command: as a real subprocess and in-process, against the test Redis."""

from __future__ import annotations

import json
import os
import pickle
import pty
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest
import redis
import torch
from pydantic import SecretStr
from safetensors.torch import save_file

from hotswap import keys
from hotswap import status as st
from hotswap.embedded import EmbeddedRedis
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher import cli
from publisher.publisher import Publisher

ROOT = Path(__file__).resolve().parents[1]
N = 64 * 1024  # float32 elements: 256 KiB a tensor, 4 chunks of 64 KiB


def weights(seed: int = 0, names: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    names = names or tuple(f"layer.{i}.{k}" for i in range(3) for k in ("weight", "bias"))
    return {n: torch.randn(N, generator=g) for n in names}


@pytest.fixture
def env(server: EmbeddedRedis, client: redis.Redis, tmp_path: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HOTSWAP_")}
    return {
        **base,
        "HOTSWAP_REDIS_URL": server.url,
        "HOTSWAP_CHUNK_BYTES": str(64 * 1024),
        "HOTSWAP_RETRY_ATTEMPTS": "2",
        "HOTSWAP_RETRY_MAX_WAIT": "0.1",
        "HOTSWAP_CONNECT_TIMEOUT": "1",
    }


def hotswap(
    env: dict[str, str], *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """The real command in a child process (cwd away from any .env)."""
    return subprocess.run(
        [sys.executable, "-m", "publisher", *args],
        env=env,
        check=False,
        cwd=cwd or Path("/"),
        capture_output=True,
        text=True,
        timeout=100,
    )


@pytest.fixture
def run(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[Any]:
    """``run(*args) -> (code, stdout, stderr)`` in-process, same environment."""
    for k in [k for k in os.environ if k.startswith("HOTSWAP_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        if k.startswith("HOTSWAP_"):
            monkeypatch.setenv(k, v)
    monkeypatch.chdir("/")

    def call(*args: str) -> tuple[int, str, str]:
        code = cli.main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    yield call


@pytest.fixture
def pub(settings: HotswapSettings, client: redis.Redis) -> Iterator[Publisher]:
    p = Publisher("m", settings=settings, connection=client)
    yield p
    p.close()


def snapshot(client: redis.Redis) -> dict[bytes, bytes | None]:
    return {k: client.dump(k) for k in client.keys("*")}


def blob_count(client: redis.Redis) -> int:
    return sum(1 for _ in client.scan_iter(match=keys.blob_prefix("hotswap", "m") + "*"))


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def shard(folder: Path, state: dict[str, torch.Tensor]) -> None:
    names = sorted(state)
    half = len(names) // 2
    parts = {"model-1.safetensors": names[:half], "model-2.safetensors": names[half:]}
    for file, part in parts.items():
        save_file({n: state[n] for n in part}, str(folder / file))
    weight_map = {n: f for f, part in parts.items() for n in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


# -- the acceptance story, as a subprocess ------------------------------------------


def test_publish_formats_and_only_changed_bytes_move(
    env: dict[str, str], client: redis.Redis, tmp_path: Path
) -> None:
    # Full blobs only, so a changed tensor moves whole (deltas: test_publish_delta.py).
    env = {**env, "HOTSWAP_DELTAS": "false"}
    sd = weights()
    save_file(sd, str(tmp_path / "v1.safetensors"))
    before_mem = used_memory(client)
    p = hotswap(env, "publish", "m", str(tmp_path / "v1.safetensors"), "-m", "first", "--json")
    assert p.returncode == 0, p.stderr
    r1 = json.loads(p.stdout)
    total = 6 * N * 4
    assert (r1["version"], r1["bytes_uploaded"], r1["tensors_changed"]) == (1, total, 6)
    first_mem = used_memory(client) - before_mem
    assert blob_count(client) == 6 * 4

    # A sharded checkpoint with one tensor changed: only its 256 KiB move.
    sd["layer.1.weight"] = sd["layer.1.weight"] * 2
    (tmp_path / "sharded").mkdir()
    shard(tmp_path / "sharded", sd)
    keys_before, mem_before = client.dbsize(), used_memory(client)
    p = hotswap(env, "publish", "m", str(tmp_path / "sharded"), "--json")
    assert p.returncode == 0, p.stderr
    r2 = json.loads(p.stdout)
    assert (r2["version"], r2["parent"], r2["tensors_changed"]) == (2, 1, 1)
    assert r2["bytes_uploaded"] == N * 4 and r2["bytes_skipped"] == total - N * 4
    assert client.dbsize() - keys_before == 4 + 1  # 4 chunks and the manifest
    grew = used_memory(client) - mem_before
    assert N * 4 <= grew < 2 * N * 4, (grew, first_mem)
    assert grew < first_mem / 3

    # A .pt with another tensor changed.
    sd["layer.2.bias"] = sd["layer.2.bias"] + 1
    torch.save(sd, tmp_path / "v3.pt")
    p = hotswap(env, "publish", "m", str(tmp_path / "v3.pt"))
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("model m: published v3: 1 of 6 tensors changed, 262.1 kB uploaded")

    p = hotswap(env, "show", "m", "--json")
    shown = json.loads(p.stdout)
    assert shown["version"] == 3 and shown["parent"] == 2
    assert [t["name"] for t in shown["tensors"]] == sorted(sd)
    assert all(t["dtype"] == "F32" and t["shape"] == [N] for t in shown["tensors"])

    p = hotswap(env, "diff", "m", "1", "3", "--json")
    d = json.loads(p.stdout)
    assert [c["name"] for c in d["changed"]] == ["layer.1.weight", "layer.2.bias"]
    assert d["added"] == d["removed"] == [] and d["unchanged"] == 4
    assert d["changed"][0]["norm_ratio"] == pytest.approx(2.0, rel=1e-5)


def test_only_inherits_and_rollback_uploads_nothing(
    env: dict[str, str], client: redis.Redis, store: Store, pub: Publisher, tmp_path: Path
) -> None:
    pub.publish(weights(0))
    save_file(weights(1), str(tmp_path / "b.safetensors"))  # every tensor differs
    p = hotswap(env, "publish", "m", str(tmp_path / "b.safetensors"), "--only", "layer.1.*")
    assert p.returncode == 0, p.stderr
    assert "published v2: 2 of 6 tensors changed" in p.stdout
    v1, v2 = store.manifest(1).by_name(), store.manifest(2).by_name()
    assert {n for n in v2 if v2[n] != v1[n]} == {"layer.1.weight", "layer.1.bias"}

    blobs, count = blob_count(client), client.dbsize()
    p = hotswap(env, "rollback", "m", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert (r["version"], r["kind"], r["rollback_to"], r["bytes_uploaded"]) == (3, "rollback", 1, 0)
    m3 = store.manifest(3)
    assert m3.tensors == store.manifest(1).tensors and m3.kind == "rollback"
    assert blob_count(client) == blobs and client.dbsize() == count + 1  # the manifest only


def test_a_second_rollback_says_what_it_skipped(run: Any, pub: Publisher) -> None:
    pub.publish(weights(0))  # v1, good
    pub.publish(weights(1))  # v2, bad
    pub.rollback()  # v3 = v1
    pub.publish(weights(3))  # v4, good
    pub.publish(weights(4))  # v5, bad
    code, out, _ = run("rollback", "m", "--json")  # v6 = v4
    assert code == 0 and json.loads(out)["skipped"] == {}
    code, out, err = run("rollback", "m")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith("model m: rolled back to v3 as v7 ")
    assert lines[1:] == [
        "model m: chose v3, passing over v5: retracted by v6; v4: holds what v6 holds",
        "model m: no live agents: nobody to apply v7 yet",
    ]
    code, out, err = run("rollback", "m")
    assert (code, out) == (1, "")
    assert err == (
        "hotswap: error: model 'm': no earlier version to roll back to from v7 (skipped "
        "v6, v5, v4: retracted by v7; v3, v1: holds what v7 holds; v2: retracted by v3); "
        "pass --to VERSION (to=...) to pick one\n"
    )


def test_gc_then_rollback_to_collected_version(
    env: dict[str, str], client: redis.Redis, store: Store, pub: Publisher
) -> None:
    for seed in range(3):
        pub.publish(weights(seed))
    index = keys.blob_index_key("hotswap", "m")
    client.zadd(index, {m: 1.0 for m in client.zrange(index, 0, -1)})  # all past the grace
    p = hotswap(env, "gc", "m", "--keep", "1", "--json")
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert (r["kept"], r["deleted_versions"], r["blobs_deleted"]) == ([3], [1, 2], 12)
    assert store.versions() == [3] and blob_count(client) == 6 * 4
    before = snapshot(client)
    p = hotswap(env, "rollback", "m", "--to", "1")
    assert p.returncode == 1
    assert p.stderr == (
        "hotswap: error: cannot roll back model 'm' to v1: its manifest was collected by gc "
        "(or never committed); see `hotswap log`\n"
    )
    assert snapshot(client) == before


def test_verify_catches_a_corrupted_blob(
    env: dict[str, str], run: Any, client: redis.Redis, store: Store, pub: Publisher
) -> None:
    pub.publish(weights())
    code, out, _ = run("verify", "m")
    assert code == 0 and out.startswith("model m v1: all 6 tensors verified (1.6 MB re-hashed")
    e = store.manifest(1).by_name()["layer.2.weight"]
    chunk = keys.blob_key("hotswap", "m", e.digest, e.chunk_bytes, 3)
    raw = client.get(chunk)
    assert raw is not None
    client.set(chunk, raw[:-1] + bytes([raw[-1] ^ 0xFF]))  # same length, one byte off
    p = hotswap(env, "verify", "m", "1")
    assert p.returncode == 1
    assert p.stderr == (
        "hotswap: error: model 'm' v1: 1 of 6 tensors failed verification: 'layer.2.weight' "
        "(digest mismatch: the stored bytes were altered); publish those weights again\n"
    )
    code, out, err = run("verify", "m", "--json")
    assert code == 1 and err.startswith("hotswap: error: model 'm' v1: 1 of 6 tensors failed")
    data = json.loads(out)
    assert data["ok"] is False and list(data["bad"]) == ["layer.2.weight"]


def test_progress_bar_on_a_terminal_only(env: dict[str, str], run: Any, tmp_path: Path) -> None:
    save_file(weights(), str(tmp_path / "m.safetensors"))
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "publisher", "publish", "m", str(tmp_path / "m.safetensors")],
        env={**env, "TERM": "xterm", "COLUMNS": "120"},
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd="/",
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=60) == 0
    text = b"".join(chunks).decode(errors="replace")
    assert "hashing" in text and "uploading" in text
    assert "1.6/1.6 MB" in text and "/s" in text  # bytes done/total and rate
    assert "published v1" in text
    # Off a terminal: no bar, just the result line.
    save_file(weights(1), str(tmp_path / "m2.safetensors"))
    code, out, err = run("publish", "m", str(tmp_path / "m2.safetensors"))
    assert code == 0 and out.startswith("model m: published v2") and "uploading" not in out + err


def test_real_process_exit_codes(env: dict[str, str], run: Any, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pt"
    p = hotswap(env, "publish", "m", str(missing))
    assert (p.returncode, p.stderr) == (
        1,
        f"hotswap: error: {missing}: no such file or directory\n",
    )
    with EmbeddedRedis() as dead:
        url = dead.url  # a port nothing listens on once the server stopped
    p = hotswap({**env, "HOTSWAP_REDIS_URL": url}, "status", "m")
    assert p.returncode == 3 and p.stdout == ""
    assert p.stderr.startswith(
        "hotswap: error: Redis unreachable while looking the model up for model 'm' ("
    )
    assert p.stderr.endswith("; check HOTSWAP_REDIS_URL and the server\n")
    assert "Traceback" not in p.stderr
    code, _, err = run("show")
    assert code == 2 and "the following arguments are required: model" in err


# -- bad input, in-process: exact message, exit code, Redis unchanged -----------------


@pytest.fixture
def published(pub: Publisher, client: redis.Redis) -> dict[bytes, bytes | None]:
    pub.publish(weights())
    return snapshot(client)


def test_bad_files(
    run: Any, client: redis.Redis, published: dict[bytes, bytes | None], tmp_path: Path
) -> None:
    txt = tmp_path / "notes.txt"
    txt.write_text("not weights")
    fake = tmp_path / "fake.safetensors"
    fake.write_text("not weights")
    pt = tmp_path / "trainer.pt"
    torch.save({"layer.0.weight": torch.ones(2), "epoch": 3}, pt)
    cases = [
        (tmp_path / "missing.safetensors", "{p}: no such file or directory"),
        (
            txt,
            "{p}: not a checkpoint (expected .safetensors, .pt, .pth, .bin, a *.index.json "
            "or a folder of these)",
        ),
        (
            pt,
            "{p}: 'epoch' is of type int, not a tensor; publish a flat state dict of tensors "
            "(model.state_dict())",
        ),
    ]
    for path, message in cases:
        assert run("publish", "m", str(path)) == (
            1,
            "",
            f"hotswap: error: {message.format(p=path)}\n",
        )
    code, _, err = run("publish", "m", str(fake))
    assert code == 1 and err.startswith(f"hotswap: error: {fake}: not a valid safetensors file: ")
    assert snapshot(client) == published


def test_code_executing_pt_is_refused_without_running(
    run: Any, client: redis.Redis, published: dict[bytes, bytes | None], tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str, str]]:
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    torch.save({"layer.0.weight": torch.ones(2), "x": Exploit()}, path)
    code, out, err = run("publish", "m", str(path))
    assert code == 1 and out == ""
    assert err.startswith(
        f"hotswap: error: {path}: not a loadable tensor checkpoint (torch.load with "
        "weights_only=True refused it: UnpicklingError: "
    )
    assert err.count("\n") == 1
    assert not marker.exists()
    assert snapshot(client) == published


def test_raw_pickled_bin_is_one_line_on_stderr(
    env: dict[str, str], client: redis.Redis, published: dict[bytes, bytes | None], tmp_path: Path
) -> None:
    # torch.load warned about the pickle protocol on stderr before the error.
    path = tmp_path / "raw.bin"
    path.write_bytes(pickle.dumps({"layer.0.weight": torch.ones(2)}))
    done = hotswap(env, "publish", "m", str(path))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(
        f"hotswap: error: {path}: not a loadable tensor checkpoint (torch.load with "
        "weights_only=True refused it: "
    )
    assert done.stderr.count("\n") == 1, done.stderr
    assert snapshot(client) == published


def test_publish_lacking_tensors_needs_exclude_and_links_out_need_follow(
    run: Any, client: redis.Redis, published: dict[bytes, bytes | None], tmp_path: Path
) -> None:
    sd = weights(1)
    del sd["layer.2.bias"]
    folder, elsewhere = tmp_path / "ckpt", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    save_file(sd, str(elsewhere / "model.safetensors"))
    (folder / "model.safetensors").symlink_to(elsewhere / "model.safetensors")
    code, out, err = run("publish", "m", str(folder))
    assert (code, out) == (1, "")
    assert err == (
        f"hotswap: error: {folder / 'model.safetensors'} is a symlink to "
        f"{elsewhere / 'model.safetensors'}, outside {folder}; pass follow_symlinks=True "
        "(--follow-symlinks) to publish it anyway\n"
    )
    code, out, err = run("publish", "m", str(folder), "--follow-symlinks")
    assert (code, out) == (1, "")
    assert err == (
        f"hotswap: error: {folder / 'model.safetensors'}: a full publish lacks 1 tensor of "
        "head v1 ('layer.2.bias'); add them, or name them with exclude=[GLOB] (--exclude GLOB) "
        "to drop them from the new version, or publish a subset with only=[GLOB] (--only GLOB)\n"
    )
    assert snapshot(client) == published
    code, out, err = run(
        "publish", "m", str(folder), "--follow-symlinks", "--exclude", "layer.2.*", "--json"
    )
    assert code == 0, err
    assert json.loads(out)["version"] == 2
    assert "layer.2.bias" not in {t.name for t in Store(client, "m").manifest(2).tensors}


def test_bad_names_versions_and_usage(
    run: Any, client: redis.Redis, published: dict[bytes, bytes | None], tmp_path: Path
) -> None:
    assert run("status", "bad name") == (
        1,
        "",
        "hotswap: error: invalid model name 'bad name': use 1-128 characters from "
        "A-Z a-z 0-9 . _ -\n",
    )
    assert run("show", "m", "9") == (
        1,
        "",
        "hotswap: error: model 'm' has no version 9 (unknown or collected)\n",
    )
    assert run("diff", "m", "1", "4")[2] == (
        "hotswap: error: model 'm' has no version 4 (unknown or collected)\n"
    )
    assert run("rollback", "m", "--to", "5")[2] == (
        "hotswap: error: model 'm' has no version 5 (head is v1)\n"
    )
    assert run("show", "other")[2] == (
        "hotswap: error: model 'other' is not in Redis (namespace 'hotswap'); "
        "`hotswap models` lists the models there\n"
    )
    code, _, err = run("show", "m", "x")
    assert code == 2 and "argument version: version must be a number, got 'x'" in err
    assert run("frobnicate", "m")[0] == 2
    assert run("gc", "m", "--keep", "0") == (
        1,
        "",
        "hotswap: error: --keep must be at least 1, got 0\n",
    )
    assert snapshot(client) == published


def test_bad_setting_is_one_line(run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOTSWAP_CHUNK_BYTES", "lots")
    code, out, err = run("status", "m")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert err.startswith("hotswap: error: invalid settings: HOTSWAP_CHUNK_BYTES='lots': ")


def test_debug_adds_the_traceback(run: Any, published: dict[bytes, bytes | None]) -> None:
    code, _, err = run("--debug", "show", "m", "9")
    assert code == 1 and "Traceback (most recent call last)" in err
    assert err.endswith("hotswap: error: model 'm' has no version 9 (unknown or collected)\n")


def test_concurrent_publisher_is_a_version_conflict(
    run: Any,
    client: redis.Redis,
    settings: HotswapSettings,
    published: dict[bytes, bytes | None],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    save_file(weights(5), str(tmp_path / "mine.safetensors"))
    original = Store.reserve_version

    def rival_commits_first(self: Store) -> int:
        # Another publisher lands between our read of head and our commit.
        monkeypatch.setattr(Store, "reserve_version", original)
        with Publisher("m", settings=settings, connection=client) as rival:
            rival.publish(weights(9))
        return original(self)

    monkeypatch.setattr(Store, "reserve_version", rival_commits_first)
    code, out, err = run("publish", "m", str(tmp_path / "mine.safetensors"))
    assert (code, out) == (1, "")
    assert err == (
        "hotswap: error: model 'm': head is v2, not v1 as this publish read it; another "
        "publisher committed first, publish again on top of it\n"
    )
    assert client.get(keys.head_key("hotswap", "m")) == b"2"
    assert client.get(keys.manifest_key("hotswap", "m", 3)) is None


# -- read commands ---------------------------------------------------------------------


def test_status_shows_agents_lag_rejections_and_expired(
    run: Any, store: Store, pub: Publisher
) -> None:
    pub.publish(weights(0))
    pub.publish(weights(1))
    now = time.time()
    lagging = st.AgentStatus(
        "srv-a",
        "host-a",
        101,
        state="idle",
        version=1,
        lineage=store.manifest(2).lineage,
        rejected_version=2,
        rejection={"layer.0.weight": ["norm ratio 50.0 above 10.0"]},
        updated=now - 2,
    )
    current = st.AgentStatus("srv-b", "host-b", 202, state="idle", version=2, updated=now)
    gone = st.AgentStatus("srv-c", "host-c", 303, state="idle", version=1, updated=now - 60)
    store.write_agent_status("srv-a", st.encode(lagging), ttl=60)
    store.write_agent_status("srv-b", st.encode(current), ttl=60)
    store.write_agent_status("srv-c", st.encode(gone), ttl=0.01)
    # Its heartbeat lives 10 ms: ask Redis until it has expired (each try a round trip).
    for _ in range(100_000):
        if not {agent: alive for agent, _, alive in store.agent_records()}["srv-c"]:
            break
    else:
        raise AssertionError("srv-c's heartbeat never expired")
    code, out, _ = run("status", "m", "--json")
    assert code == 4  # srv-a, alive, rejected head
    data = json.loads(out)
    assert data["head"] == 2
    assert data["unhealthy"] == ["agent srv-a rejected head v2 (runs v1)"]
    rows = {a["agent_id"]: a for a in data["agents"]}
    assert rows["srv-a"]["lag"] == 1 and rows["srv-a"]["alive"] is True
    assert rows["srv-a"]["last_rejection"] == "layer.0.weight: norm ratio 50.0 above 10.0"
    assert rows["srv-a"]["heartbeat_age"] == pytest.approx(2, abs=1)
    assert rows["srv-b"]["lag"] == 0 and rows["srv-b"]["pid"] == 202
    assert rows["srv-c"]["alive"] is False
    code, out, _ = run("status", "m")
    assert code == 4 and "not healthy: agent srv-a rejected head v2 (runs v1)" in out
    lines = {line.split("│")[1].strip(): line for line in out.splitlines() if "│ srv-" in line}
    assert "host-a" in lines["srv-a"] and "v2: layer.0.weight: norm ratio 50.0" in lines["srv-a"]
    assert "expired" in lines["srv-c"] and "expired" not in lines["srv-b"]
    assert "head v2" in out


def test_status_shows_an_agent_running_other_content_than_its_version_as_diverged(
    run: Any, store: Store, pub: Publisher
) -> None:
    """Issue 13, defect 1: after Redis was restored from an older snapshot one number
    can name two manifests; an agent whose manifest digest is not its version's
    stored one is "diverged", never lag 0. Records without a digest (older agents)
    show their lag as before."""
    pub.publish(weights(0))
    pub.publish(weights(1))
    held = blake3.blake3(store.manifest_bytes(2)).hexdigest()
    lineage = store.manifest(2).lineage
    now = time.time()
    records = {
        "srv-same": st.AgentStatus("srv-same", "h", 1, "idle", 2, lineage, held, updated=now),
        "srv-other": st.AgentStatus("srv-other", "h", 2, "idle", 2, lineage, "0" * 64),
        "srv-older": st.AgentStatus("srv-older", "h", 3, "idle", 2, lineage, updated=now),
    }
    for agent_id, record in records.items():
        store.write_agent_status(agent_id, st.encode(record), ttl=60)
    code, out, _ = run("status", "m", "--json")
    assert code == 4  # srv-other, alive, is diverged
    rows = {a["agent_id"]: a for a in json.loads(out)["agents"]}
    assert (rows["srv-same"]["lag"], rows["srv-same"]["diverged"]) == (0, False)
    assert (rows["srv-other"]["lag"], rows["srv-other"]["diverged"]) == (None, True)
    assert rows["srv-other"]["manifest_digest"] == "0" * 64
    assert (rows["srv-older"]["lag"], rows["srv-older"]["diverged"]) == (0, False)
    code, out, _ = run("status", "m")
    assert code == 4
    lines = {line.split("│")[1].strip(): line for line in out.splitlines() if "│ srv-" in line}
    assert "diverged" in lines["srv-other"]
    assert "diverged" not in lines["srv-same"] and "diverged" not in lines["srv-older"]


def test_status_with_signing_keys_names_the_versions_they_strand(
    run: Any,
    settings: HotswapSettings,
    client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 13, key revocation: with the agents' keys in its environment, ``status``
    says whether agents accept the signed head and which stored versions they refuse."""
    old, new = "revoked-key-0123456789abcdef", "current-key-fedcba9876543210"
    first = settings.model_copy(update={"signing_keys": [SecretStr(old)]})
    with Publisher("m", settings=first, connection=client) as p:
        p.publish(weights(0))
    both = settings.model_copy(update={"signing_keys": [SecretStr(new), SecretStr(old)]})
    with Publisher("m", settings=both, connection=client) as p:
        p.publish(weights(1))
    monkeypatch.setenv("HOTSWAP_SIGNING_KEYS", new)  # old was dropped everywhere
    code, out, _ = run("status", "m", "--json")
    assert code == 0
    signing = json.loads(out)["signing"]
    assert signing["head"]["version"] == 2 and signing["head"]["expires"] is None
    (row,) = signing["unverifiable"]
    assert row["version"] == 1 and "is signed with unknown key id" in row["reason"]
    code, out, _ = run("status", "m")
    assert code == 0
    assert "signed head: v2 (key id " in out
    assert "v1: not verifiable with these signing keys, agents refuse it: manifest of m v1" in out
    monkeypatch.setenv("HOTSWAP_SIGNING_KEYS", old)  # agents that know only the old key
    code, out, _ = run("status", "m")
    assert code == 0 and "signed head: refused by agents: signed head of model 'm' is " in out
    monkeypatch.delenv("HOTSWAP_SIGNING_KEYS")
    code, out, _ = run("status", "m", "--json")
    assert json.loads(out)["signing"] is None


def test_log_show_diff_human_and_json(run: Any, pub: Publisher) -> None:
    pub.publish(weights(0), message="first")
    sd = weights(0)
    sd["layer.0.bias"] = sd["layer.0.bias"] * 3
    sd["extra"] = torch.zeros(3)
    pub.publish(sd, message="second", force=True)  # a new tensor: the model changed
    pub.rollback()
    code, out, _ = run("log", "m", "--json")
    rows = json.loads(out)
    assert [(r["version"], r["kind"]) for r in rows] == [
        (3, "rollback"),
        (2, "publish"),
        (1, "publish"),
    ]
    assert rows[0]["rollback_to"] == 1 and rows[2]["message"] == "first"
    assert rows[2]["parent"] is None and rows[1]["parent"] == 1
    assert isinstance(rows[0]["created"], float) and rows[1]["bytes_total"] == 6 * 4 * N + 12
    code, out, _ = run("log", "m")
    assert code == 0 and "rollback to v1" in out and "second" in out
    code, out, _ = run("show", "m", "2")
    assert code == 0 and "extra" in out and "layer.0.bias" in out and "second" in out
    code, out, _ = run("diff", "m", "1", "2")
    assert code == 0
    row = next(line for line in out.splitlines() if "layer.0.bias" in line)
    assert "changed" in row and "3" in row
    assert "added" in next(line for line in out.splitlines() if "extra" in line)


def test_options_after_the_command_and_namespace(
    run: Any, env: dict[str, str], pub: Publisher
) -> None:
    pub.publish(weights())
    assert run("status", "m", "--json", "--namespace", "other")[0] == 1
    code, out, _ = run("--namespace", "other", "show", "m")
    assert code == 1
    assert run("status", "m", "--json")[0] == 0
    code, out, _ = run("show", "m", "--redis-url", env["HOTSWAP_REDIS_URL"], "--json")
    assert code == 0 and json.loads(out)["version"] == 1


def test_demo_is_wired_lazily(run: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import publisher.demo

    calls: list[object] = []

    def fake(settings: HotswapSettings | None, console: object) -> int:
        calls.append(settings)
        return 0

    monkeypatch.setattr(publisher.demo, "run_demo", fake)
    monkeypatch.delenv("HOTSWAP_REDIS_URL")
    assert run("demo")[0] == 0 and calls == [None]
    assert run("demo", "--redis-url", "redis://127.0.0.1:1/0")[0] == 0
    assert isinstance(calls[1], HotswapSettings) and calls[1].redis_url == "redis://127.0.0.1:1/0"


def test_json_stays_valid_with_nan_norms(run: Any, pub: Publisher) -> None:
    sd = weights()
    sd["layer.0.bias"][3] = float("nan")  # the publisher publishes it; agents refuse it
    pub.publish(sd)
    code, out, _ = run("show", "m", "--json")
    assert code == 0
    row = next(t for t in json.loads(out)["tensors"] if t["name"] == "layer.0.bias")
    assert row["norm"] is None and row["max_abs"] is None  # JSON has no NaN: null


def test_identical_publish_says_so_and_exits_zero(
    run: Any, client: redis.Redis, tmp_path: Path
) -> None:
    save_file(weights(), str(tmp_path / "m.safetensors"))
    assert run("publish", "m", str(tmp_path / "m.safetensors"))[0] == 0
    before = client.dbsize()
    assert run("publish", "m", str(tmp_path / "m.safetensors")) == (
        0,
        "model m: nothing changed since v1; no new version (use --force to publish anyway)\n",
        "",
    )
    assert client.dbsize() == before and client.get(keys.head_key("hotswap", "m")) == b"1"
    code, out, _ = run("publish", "m", str(tmp_path / "m.safetensors"), "--force", "-m", "again")
    assert code == 0 and out.startswith("model m: published v2: 0 of 6 tensors changed, 0 bytes")


# What each probe prints: the heavy modules the command line imported.
_HEAVY = (
    "import sys; print(sorted(m for m in ('torch', 'numpy', 'safetensors') if m in sys.modules))"
)


def _imports(code: str, env: dict[str, str] | None = None) -> str:
    return subprocess.run(
        [sys.executable, "-c", f"{code}\n{_HEAVY}"],
        check=True,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
    ).stdout.splitlines()[-1]


def test_parsing_the_command_line_imports_no_torch() -> None:
    # torch costs ~3 s of CPU: --help and usage errors must not pay it.
    assert _imports("import publisher.cli") == "[]"
    assert _imports("import hotswap, publisher") == "[]"
    for argv in (["--help"], ["status", "--help"], ["gc", "--help"], ["diff", "m", "1", "x"]):
        probe = f"from publisher.cli import main; assert main({argv!r}) in (0, 2)"
        assert _imports(probe) == "[]", argv


def test_read_commands_import_no_torch(env: dict[str, str], pub: Publisher) -> None:
    # status, log, show and diff are run often, by people and by scripts: each
    # used to spend ~2 s importing torch (through Publisher) to read a manifest.
    pub.publish(weights(0))
    pub.publish(weights(1))
    calls = [
        (["status", "m"], 0),
        (["log", "m"], 0),
        (["show", "m"], 0),
        (["show", "m", "1"], 0),
        (["diff", "m", "1", "2"], 0),
        (["show", "m", "9"], 1),  # NotFound: the error path is torch-free too
        (["status", "nosuch"], 1),  # an unknown model, with the closest names
        (["models"], 0),
    ]
    calls += [([*argv, "--json"], code) for argv, code in calls]
    probe = "\n".join(
        ["from publisher.cli import main"]
        + [f"assert main({argv!r}) == {code}, {argv!r}" for argv, code in calls]
    )
    assert _imports(probe, env) == "[]"


def test_package_exports_resolve_on_first_use() -> None:
    assert _imports("from hotswap import HotswapSettings, ConfigError, keys") == "[]"
    assert "'torch'" in _imports("from hotswap import Agent")  # the probe can tell
    import hotswap
    import hotswap.agent
    import hotswap.validate
    import publisher.publisher

    assert hotswap.Agent is hotswap.agent.Agent and hotswap.Policy is hotswap.validate.Policy
    assert publisher.Publisher is publisher.publisher.Publisher
    assert {"Agent", "HotswapSettings", "Policy"} <= set(dir(hotswap))
    with pytest.raises(AttributeError) as e:
        hotswap.Nope
    assert str(e.value) == "module 'hotswap' has no attribute 'Nope'"
    with pytest.raises(AttributeError) as e:
        publisher.Nope
    assert str(e.value) == "module 'publisher' has no attribute 'Nope'"


def test_turning_signing_on_publishes_over_the_unsigned_head_and_says_so(
    run: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, client: redis.Redis
) -> None:
    save_file(weights(), str(tmp_path / "w.safetensors"))
    assert run("publish", "m", str(tmp_path / "w.safetensors"))[0] == 0
    monkeypatch.setenv("HOTSWAP_SIGNING_KEYS", "k1-secret")
    code, out, _ = run("publish", "m", str(tmp_path / "w.safetensors"))
    assert code == 0
    assert "published v2: 6 of 6 tensors changed" in out
    assert (
        "parent v1 was not trusted (manifest of m v1 is unsigned, but signing keys are "
        "configured), so every tensor was checked and counted as changed"
    ) in " ".join(out.split())
    code, out, _ = run("log", "m", "--json")
    assert code == 0
    rows = json.loads(out)
    newest = rows[0] if isinstance(rows, list) else rows["log"][0]
    assert newest["untrusted_parent"].startswith("manifest of m v1 is unsigned")
    assert client.get("hotswap:{m}:head") == b"2"


def test_rollback_from_a_garbled_head_says_it_did_not_trust_it(
    run: Any, tmp_path: Path, client: redis.Redis
) -> None:
    for seed in (0, 1):
        save_file(weights(seed), str(tmp_path / f"w{seed}.safetensors"))
        assert run("publish", "m", str(tmp_path / f"w{seed}.safetensors"))[0] == 0
    client.set("hotswap:{m}:manifest:2", b"\x93garbage")
    code, out, _ = run("rollback", "m", "--no-wait")
    assert code == 0
    assert " ".join(out.split()) == (
        "model m: rolled back to v1 as v3 (6 of 6 tensors differ from v2; 0 bytes uploaded); "
        "v2 was not trusted (manifest of m v2 is not valid msgpack: ExtraData: unpack(b) "
        "received extra data.), so every tensor counts as changed"
    )
    assert client.get("hotswap:{m}:head") == b"3"
