"""README.md cannot rot: every fenced block is run or checked, and so is every table.

Python blocks run (in order, in one scratch directory) against the test Redis
with HOTSWAP_REDIS_URL set; shell lines run through the real CLI or, for make,
docker and curl, are checked against the Makefile, docker-compose.yml and a
live example server; the ACL lines are loaded into a real redis-server and
used; the redis.conf lines start one. A block in a language with no check
fails ``test_every_block_has_a_check``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import re
import runpy
import shlex
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
import yaml
from pydantic import SecretStr

from hotswap.embedded import EmbeddedRedis
from hotswap.settings import HotswapSettings
from hotswap.store import Store
from publisher import cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RELIABILITY = ROOT / "docs" / "reliability.md"
TEXT = README.read_text()


@dataclass(frozen=True)
class Block:
    lang: str
    body: str
    line: int

    def __str__(self) -> str:
        return f"README.md:{self.line} ```{self.lang}"


def blocks() -> list[Block]:
    found = []
    for match in re.finditer(r"^ *```(\S*)\n(.*?)^ *```\s*$", TEXT, flags=re.M | re.S):
        found.append(Block(match[1], match[2], TEXT.count("\n", 0, match.start()) + 1))
    return found


def shell_lines(block: Block) -> list[list[str]]:
    """The block's commands as argument lists (comments and blank lines dropped)."""
    return [
        words for line in block.body.splitlines() if (words := shlex.split(line, comments=True))
    ]


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][\w-]*):", text, flags=re.M))


def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


# -- checks of single shell lines that need no Redis ---------------------------


def check_make(words: list[str]) -> None:
    assert words[1:] and set(words[1:]) <= make_targets(), f"no Makefile target for {words}"


def check_export(words: list[str]) -> None:
    # Never applied: the tour's example URL is the real 6379, which tests must not touch.
    name, _, value = words[1].partition("=")
    field = name.removeprefix("HOTSWAP_").lower()
    assert name.startswith("HOTSWAP_") and field in HotswapSettings.model_fields, name
    HotswapSettings(**{field: value}, _env_file=None)  # type: ignore[arg-type,call-arg]


def check_docker(words: list[str]) -> None:
    assert words[:2] == ["docker", "compose"], words
    spec = compose()
    rest = words[2:]
    if "--profile" in rest:
        profile = rest[rest.index("--profile") + 1]
        assert any(profile in s.get("profiles", []) for s in spec["services"].values())
    services = [w for w in rest if w in spec["services"]]
    assert services, f"{' '.join(words)} names no service of docker-compose.yml"
    assert rest[0] in ("up", "run", "--profile", "logs", "down", "ps"), words


STATIC: dict[str, Callable[[list[str]], None]] = {
    "make": check_make,
    "export": check_export,
    "docker": check_docker,
}
LIVE = {"hotswap", "curl", "mkdir", "python"}
# hotswap.workers' frame pool, and tqdm's monitor (transformers' save_pretrained).
PROCESS_THREADS = ("hotswap-frames", "tqdm_monitor")


# -- the tour, run for real ----------------------------------------------------


class Tour:
    """Runs the README's python and shell blocks in order, in one scratch directory."""

    def __init__(self, settings: HotswapSettings, workdir: Path) -> None:
        self.settings = settings
        self.workdir = workdir
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def python(self, block: Block) -> None:
        path = self.workdir / f"readme_line_{block.line}.py"
        path.write_text(block.body)
        before = set(threading.enumerate())
        runpy.run_path(str(path), run_name="__main__")
        # A snippet that leaves an agent thread running would not be one to copy;
        # pools that live as long as the process by design are not its doing.
        left = [t.name for t in set(threading.enumerate()) - before]
        left = [name for name in left if not name.startswith(PROCESS_THREADS)]
        assert not left, f"{block} left threads running: {left}"

    def shell(self, block: Block) -> None:
        for words in shell_lines(block):
            if words[0] == "hotswap":
                code = cli.main(words[1:])
                assert code == 0, f"{block}: `{shlex.join(words)}` exited {code}"
            elif words[0] == "curl":
                self.curl(words)
            elif words[0] == "mkdir":
                assert words[1] == "-p"
                for name in words[2:]:
                    (self.workdir / name).mkdir(parents=True, exist_ok=True)
            elif words[0] == "python":
                assert words[1] == "-c"
                self.python(Block("python -c", words[2], block.line))
            elif words[0] == "docker":
                check_docker(words)
                if "run" in words and "publisher" in words:
                    self.compose_publish()
            else:
                STATIC[words[0]](words)

    def compose_publish(self) -> None:
        """The compose publisher's command, its volume mapped back onto this directory."""
        service = compose()["services"]["publisher"]
        host, container, _ = service["volumes"][0].split(":")
        command = [w.replace(container, str(self.workdir / host)) for w in service["command"]]
        assert command[0] == "hotswap"
        before = Store(redis.Redis.from_url(self.settings.redis_url), command[2]).head()
        assert cli.main(command[1:]) == 0
        after = Store(redis.Redis.from_url(self.settings.redis_url), command[2]).head()
        assert after == (before or 0) + 1
        # The example server runs that model: it must pick the version up.
        self.wait_server_version(after)

    def wait_server_version(self, version: int) -> None:
        base = self.example_server()
        assert self._server is not None
        if not self._server.agent.wait_for(version, 15):
            raise AssertionError(f"the example server did not apply v{version}")
        with urllib.request.urlopen(base + "/version", timeout=5) as reply:
            assert json.loads(reply.read())["version"] == version

    def curl(self, words: list[str]) -> None:
        url = next(w for w in words[1:] if "localhost:" in w)
        data = words[words.index("-d") + 1].encode() if "-d" in words else None
        path = "/" + url.split("/", 1)[1]
        # compose publishes the server on 8000; here it runs on a free port.
        assert url.startswith("localhost:8000/")
        request = urllib.request.Request(self.example_server() + path, data=data)
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert reply.status == 200
            assert isinstance(json.loads(reply.read()), dict)

    def example_server(self) -> str:
        if self._server is None:
            spec = importlib.util.spec_from_file_location(
                "readme_serve", ROOT / "examples/serve.py"
            )
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            self._close = module.close_server
            self._server = module.make_server("tiny", self.settings)
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.05}
            )
            self._thread.start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            assert self._thread is not None
            self._thread.join(5)
            self._close(self._server)


@pytest.fixture
def tour(
    server: EmbeddedRedis,
    settings: HotswapSettings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Tour]:
    import os

    for name in list(os.environ):
        if name.startswith("HOTSWAP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("HOTSWAP_REDIS_URL", server.url)
    monkeypatch.setenv("HOTSWAP_POLL_INTERVAL", "0.5")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    runner = Tour(settings, tmp_path)
    try:
        yield runner
    finally:
        runner.close()


RUN: dict[str, Callable[[Tour, Block], None]] = {
    "python": Tour.python,
    "bash": Tour.shell,
}


def check_text(block: Block) -> None:
    """The CLI synopsis: every command, option and positional as the parser has them."""
    commands = subcommands()
    shared = {"--redis-url", "--namespace", "--json", "--debug", "-h", "--help"}
    listed = []
    for words in shell_lines(block):
        assert words[0] == "hotswap", f"{block}: {words}"
        name = words[1]
        listed.append(name)
        parser = commands[name]
        by_flag = {f: a for a in parser._actions for f in a.option_strings}
        positionals = [a for a in parser._actions if not a.option_strings]
        shown: list[str] = []
        documented: set[str] = set()
        rest = iter(words[2:])
        for word in rest:
            token = word.strip("[]").removesuffix("...").strip("[]")
            if token.startswith("-"):
                assert token in by_flag, f"{block}: `hotswap {name}` has no option {token}"
                documented.add(token)
                if by_flag[token].nargs != 0:
                    metavar = next(rest).strip("[]").removesuffix("...").strip("]")
                    assert metavar.isupper(), f"{block}: {token} takes a value"
            else:
                assert token.isupper(), f"{block}: {word}"
                shown.append(word)
        assert len(shown) == len(positionals), f"{block}: `hotswap {name}` arguments {shown}"
        for word, action in zip(shown, positionals, strict=True):
            assert word.startswith("[") == (action.nargs == "?"), f"{block}: {word} optional?"
        for action in parser._actions:
            flags = set(action.option_strings)
            if flags and not flags & shared:
                assert flags & documented, f"{block}: `hotswap {name}` {flags} undocumented"
    assert sorted(listed) == sorted(commands), "the synopsis lists every command once"


def reliability_acl_lines() -> list[str]:
    """The ``ACL SETUSER`` block of docs/reliability.md (tests/reliability/test_rel_acl.py's)."""
    found: list[list[str]] = [
        body.strip().splitlines()
        for body in re.findall(r"```[a-z]*\n(.*?)```", RELIABILITY.read_text(), flags=re.S)
        if body.strip()
        and all(line.startswith("ACL SETUSER ") for line in body.strip().splitlines())
    ]
    assert len(found) == 1, f"{RELIABILITY} must hold one block of ACL SETUSER lines"
    return found[0]


def check_acl(block: Block) -> None:
    # One source of truth: the users tests/reliability/test_rel_acl.py runs a
    # whole workflow under, line for line.
    assert block.body.strip().splitlines() == reliability_acl_lines()
    words = [line.split() for line in reliability_acl_lines()]
    assert [w[:4] for w in words] == [
        ["ACL", "SETUSER", "hotswap-admin", "reset"],
        ["ACL", "SETUSER", "hotswap-agent-web-1", "reset"],
        ["ACL", "SETUSER", "hotswap-publisher", "reset"],
        ["ACL", "SETUSER", "default", "reset"],  # last: it logs the one running them out
    ]
    assert words[-1] == ["ACL", "SETUSER", "default", "reset"]
    # Loaded and used for real by test_acl_users_publish_and_apply_with_least_privilege.


def check_conf(block: Block) -> None:
    # Started for real by test_redis_conf_block_is_accepted_by_redis.
    assert all(len(line.split()) == 2 for line in block.body.strip().splitlines())


def check_console(block: Block) -> None:
    # Matched line by line against a real run in tests/test_demo.py.
    lines = block.body.strip().splitlines()
    assert lines[0] == "$ make demo"
    for line in lines[1:]:
        assert re.match(r"(hotswap demo |\d\. |\(.+\)$|Demo finished in )", line), line


def check_mermaid(block: Block) -> None:
    body = block.body
    assert body.splitlines()[0] == "sequenceDiagram"
    participants = dict(re.findall(r"participant (\w+) as ([^\n]+)", body))
    assert set(participants) == {"P", "R", "A", "M"}
    arrows = re.findall(r"^\s*(\w+)-+>>(\w+):", body, flags=re.M)
    assert {a for pair in arrows for a in pair} == set(participants)
    steps = ["upload", "commit script", "notice", "fetch only", "validate", "in place", "rejected"]
    positions = [body.find(step) for step in steps]
    assert -1 not in positions and positions == sorted(positions), positions
    assert "alt every tensor passed" in body and "else any check failed" in body


STRUCTURAL: dict[str, Callable[[Block], None]] = {
    "text": check_text,
    "acl": check_acl,
    "conf": check_conf,
    "mermaid": check_mermaid,
    "console": check_console,
}


# -- tests -----------------------------------------------------------------------


def test_every_block_has_a_check() -> None:
    found = blocks()
    assert len(found) >= 12
    for block in found:
        assert block.lang in RUN or block.lang in STRUCTURAL, f"{block}: no check for this language"
        if block.lang == "bash":
            for words in shell_lines(block):
                assert words[0] in LIVE or words[0] in STATIC, f"{block}: no check for {words}"


def test_the_two_set_up_commands_come_first() -> None:
    first = blocks()[0]
    assert first.lang == "bash"
    assert shell_lines(first) == [["make", "demo"], ["make", "test"]]
    assert TEXT.index("make demo") < TEXT.index("## A five-minute tour")
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: .*\n\t.*hotswap demo$", makefile, flags=re.M)
    assert re.search(r"^test: .*\n\t.*-m pytest", makefile, flags=re.M)
    assert re.search(r"python3 -m venv", makefile)  # `make demo` works on a fresh clone


def test_structural_blocks_pass_their_checks() -> None:
    for block in blocks():
        if block.lang in STRUCTURAL:
            STRUCTURAL[block.lang](block)
        elif block.lang == "bash":
            for words in shell_lines(block):
                if words[0] in STATIC:
                    STATIC[words[0]](words)


def test_tour_runs_against_redis(tour: Tour, client: redis.Redis) -> None:
    for block in blocks():
        if block.lang in RUN:
            RUN[block.lang](tour, block)
    store = Store(client, "minilm")
    # Three publishes from the training loop, two rollbacks; the checkpoint
    # publishes changed nothing, so they made no version.
    assert store.head() == 5
    log = store.log()
    assert [row.get("kind") for row in log[:2]] == ["rollback", "rollback"]
    assert (tour.workdir / "model.safetensors").exists()


def test_configuration_table_lists_every_setting_with_its_default() -> None:
    section = TEXT[TEXT.index("## Configuration") : TEXT.index("## Command line")]
    rows = re.findall(r"^\| `(HOTSWAP_\w+)` \| ([^|]+) \| ([^|]+) \|$", section, flags=re.M)
    table = {name: (default.strip(), meaning.strip()) for name, default, meaning in rows}

    def shown(value: Any) -> str:
        if value is None or value == []:
            return "(none)"
        if isinstance(value, bool):
            return f"`{str(value).lower()}`"
        return f"`{value}`"

    expected = {}
    for field, info in HotswapSettings.model_fields.items():
        default = info.get_default(call_default_factory=True)
        if isinstance(default, SecretStr):
            default = default.get_secret_value()
        expected[f"HOTSWAP_{field.upper()}"] = shown(default)
    assert list(table) == list(expected), "one row per setting, in the class's order"
    for name, default in expected.items():
        assert table[name][0] == default, f"{name}: README says {table[name][0]}, code {default}"
        assert len(table[name][1]) > 20, f"{name}: say what it means"


def test_every_setting_named_in_readme_exists() -> None:
    names = set(re.findall(r"HOTSWAP_([A-Z_]+[A-Z])", TEXT))
    assert names and {n.lower() for n in names} <= set(HotswapSettings.model_fields)


def test_inline_commands_exist() -> None:
    assert set(re.findall(r"`make (\w+)", TEXT)) <= make_targets()
    assert set(re.findall(r"`hotswap (\w+)", TEXT)) <= set(subcommands())


def test_shared_options_paragraph_matches_parser() -> None:
    start = TEXT.index("Every command takes")
    paragraph = TEXT[start : TEXT.index("\n\n", start)]
    documented = set(re.findall(r"`(--[a-z-]+)", paragraph))
    assert documented == {"--redis-url", "--namespace", "--json", "--debug"}
    for name, parser in subcommands().items():
        assert documented <= option_strings(parser), name
    assert documented <= option_strings(cli.build_parser())


def test_exit_code_table_matches_cli(client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = dict(re.findall(r"^\| (\d) \| ([^|]+) \|$", TEXT, flags=re.M))
    assert set(rows) == {"0", "1", "2", "3", "4"}
    assert (cli.OK, cli.USER_ERROR, cli.USAGE, cli.UNREACHABLE, cli.UNHEALTHY) == (0, 1, 2, 3, 4)
    assert "not healthy" in rows["4"]
    assert rows["1"].strip().startswith("user error") and "unknown model" in rows["1"]
    assert rows["2"].strip().startswith("usage error")
    assert rows["3"].strip().startswith("Redis unreachable")
    url = client.connection_pool.connection_kwargs
    live = f"redis://127.0.0.1:{url['port']}/0"
    monkeypatch.setenv("HOTSWAP_RETRY_ATTEMPTS", "1")
    assert cli.main(["--redis-url", live, "status", "nosuchmodel"]) == 1
    assert cli.main(["--redis-url", live, "show", "nosuchmodel"]) == 1
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["--redis-url", "redis://127.0.0.1:1/0", "log", "m"]) == 3


def test_links_point_at_files_and_headings() -> None:
    headings = {
        re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", TEXT, flags=re.M)
    }
    for target in re.findall(r"\]\(([^)]+)\)", TEXT):
        if target.startswith("#"):
            assert target[1:] in headings, target
        elif not target.startswith("http"):
            assert (ROOT / target).exists(), f"README links to missing {target}"


def acl_password(rule: str) -> str:
    """The password a documented ``ACL SETUSER`` line sets, as these tests set it."""
    return re.sub(r">CHANGE-ME-(\w+)-password", r">secret-\1", rule)


def test_acl_users_publish_and_apply_with_least_privilege() -> None:
    (block,) = [b for b in blocks() if b.lang == "acl"]
    from hotswap import Agent
    from publisher import Publisher

    with EmbeddedRedis() as private:
        where = f"127.0.0.1:{private.port}/0"
        # Applied verbatim and in order, by the default user of a fresh server.
        default = redis.Redis.from_url(private.url)
        for rule in block.body.strip().splitlines():
            assert default.execute_command(*acl_password(rule).split()) in (b"OK", "OK", True)
        default.close()
        # Issue 13, defect 8: the default user was left `on nopass ~* &* +@all`.
        stranger = redis.Redis.from_url(private.url)
        with pytest.raises((redis.AuthenticationError, redis.exceptions.NoPermissionError)):
            stranger.ping()
        with pytest.raises(redis.AuthenticationError):
            stranger.set("hotswap:{acl}:head", "1")
        stranger.close()
        admin = redis.Redis.from_url(f"redis://hotswap-admin:secret-admin@{where}")
        default_rule = next(r for r in admin.execute_command("ACL", "LIST") if b"default" in r)
        assert b" off " in default_rule and b"nopass" not in default_rule
        admin.execute_command("ACL", "LOG", "RESET")

        def as_user(role: str, user: str | None = None) -> HotswapSettings:
            return HotswapSettings(
                redis_url=f"redis://{user or f'hotswap-{role}'}:secret-{role}@{where}",
                poll_interval=0.5,
                retry_attempts=1,
                gc_grace_seconds=0,
                agent_id="web-1" if role == "agent" else None,
                _env_file=None,  # type: ignore[call-arg]
            )

        as_agent = as_user("agent", "hotswap-agent-web-1")
        model = torch.nn.Linear(4, 4)
        weights = {k: v * 1.5 for k, v in model.state_dict().items()}
        with Agent(model, "acl", settings=as_agent) as agent:
            with Publisher("acl", settings=as_user("publisher")) as pub:
                v1 = pub.publish(weights)
                assert agent.wait_for(v1)
                v2 = pub.publish({k: v * 1.1 for k, v in weights.items()})
                assert agent.wait_for(v2)
                assert agent.wait_for(pub.rollback())
                assert agent.reporter.flush(logging.getLogger("test"))
                assert pub.running_versions() == [3]  # its record, read by the publisher
                assert pub.gc(keep=1).deleted_versions == [1, 2]
                assert pub.verify().ok
        assert torch.equal(model.weight, weights["weight"])
        for argv in (["status", "acl"], ["log", "acl"], ["show", "acl"]):
            assert cli.main(["--redis-url", as_user("publisher").redis_url, *argv]) == 0
        assert admin.execute_command("ACL", "LOG") == [], "the workflow needed a denied command"

        agent_client = redis.Redis.from_url(as_agent.redis_url)
        for command in (
            ("SET", "hotswap:{acl}:head", "1"),
            ("SET", "hotswap:acl:blob:x:1:0", "x"),
            ("PUBLISH", "hotswap:{acl}:events", "x"),
            ("GET", "elsewhere"),
            ("SUBSCRIBE", "elsewhere"),
            ("FLUSHALL",),
            ("SET", "hotswap:{acl}:agents", "x"),  # issue 13, defect 7
            ("SET", "hotswap:{acl}:status:web-2", "x"),  # another agent's record
            ("SET", "hotswap:{acl}:agent:web-2", "x"),  # and its heartbeat
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                agent_client.execute_command(*command)
        publisher_client = redis.Redis.from_url(as_user("publisher").redis_url)
        for denied in (
            ("GET", "elsewhere"),
            ("HSET", "hotswap:{acl}:agents", "forged", "x"),  # agents' records are theirs
            ("SET", "hotswap:{acl}:agent:forged", "x"),
            ("SET", "hotswap:{acl}:status:forged", "x"),
            ("PUBLISH", "elsewhere", "x"),
            ("FLUSHALL",),
            ("CONFIG", "GET", "*"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                publisher_client.execute_command(*denied)
        agent_client.close()
        publisher_client.close()
        admin.close()


def test_acl_block_as_an_acl_file_makes_the_same_users(tmp_path: Path) -> None:
    # README: "put it in an ACL file with `ACL SETUSER` replaced by `user`".
    (block,) = [b for b in blocks() if b.lang == "acl"]
    rules = block.body.strip().splitlines()
    as_file = "".join(rule.replace("ACL SETUSER ", "user ", 1) + "\n" for rule in rules)
    acl_file = tmp_path / "users.acl"
    # The server must answer an unauthenticated PING to count as started, so it
    # starts on the file less its `default` line, which ACL LOAD then adds.
    acl_file.write_text("".join(line + "\n" for line in as_file.splitlines()[:-1]))
    with (
        EmbeddedRedis() as by_command,
        EmbeddedRedis(extra_args=["--aclfile", str(acl_file)]) as by_file,
    ):
        ours = redis.Redis.from_url(by_command.url)
        for rule in rules:
            ours.execute_command(*rule.split())
        ours.close()
        acl_file.write_text(as_file)
        theirs = redis.Redis.from_url(by_file.url)
        assert theirs.execute_command("ACL", "LOAD") in (b"OK", "OK", True)
        theirs.close()
        # Word order within a rule (the commands) follows a hash table: compare word sets.
        listed = []
        for server in (by_command, by_file):
            admin = redis.Redis.from_url(
                f"redis://hotswap-admin:CHANGE-ME-admin-password@127.0.0.1:{server.port}/0"
            )
            listed.append(
                sorted(sorted(rule.split()) for rule in admin.execute_command("ACL", "LIST"))
            )
            admin.close()
        assert listed[0] == listed[1] and len(listed[0]) == 4  # default and the three users


def mask_example() -> Block:
    (block,) = [b for b in blocks() if "Override(check_finite=False)" in b.body]
    return block


def test_mask_example_applies_and_is_rejected_without_its_override(
    tour: Tour, client: redis.Redis
) -> None:
    from hotswap import ValidationError

    block = mask_example()
    applied = runpy.run_path(_write(tour, block, "override"))
    served, version = applied["served"], applied["version"]
    assert applied["agent"].applied_version == version
    assert torch.equal(served.attn_mask, applied["attention_mask"](8, 4))  # -inf and all
    assert torch.isinf(served.attn_mask).sum() == 38

    # The same block with the default policy: the rejection README quotes.
    client.flushdb()
    strict = Block(block.lang, block.body.replace(", policy=policy)", ")"), block.line)
    assert strict.body != block.body
    with pytest.raises(ValidationError) as e:
        runpy.run_path(_write(tour, strict, "default"))
    quoted = "'attn_mask': 38 of 64 values are not finite (NaN or inf)"
    assert quoted in TEXT
    assert str(e.value) == (
        f"model 'windowed' v1 rejected, 1 tensor(s) failed validation: {quoted}"
    )


def _write(tour: Tour, block: Block, name: str) -> str:
    path = tour.workdir / f"readme_mask_{name}.py"
    path.write_text(block.body)
    return str(path)


def test_redis_conf_block_is_accepted_by_redis() -> None:
    (block,) = [b for b in blocks() if b.lang == "conf"]
    pairs = [line.split() for line in block.body.strip().splitlines()]
    args = [part for name, value in pairs for part in (f"--{name}", value)]
    with EmbeddedRedis(extra_args=args) as private:
        r = redis.Redis.from_url(private.url)
        for name, value in pairs:
            assert r.config_get(name) == {name: value}
        r.close()
