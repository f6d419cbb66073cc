"""``hotswap demo``: the whole loop on a real serving process, narrated.

Starts a Redis of its own (unless given settings, then it works under a fresh
namespace of its own and deletes only its keys), launches the example server
(``publisher.demo_server``, which examples/serve.py runs) with an embedded
agent, then publishes, updates one layer, publishes a NaN, rolls back, rolls
out a bad and a good version through two canaries (``publisher.demo_rollout``)
and shows ``hotswap status``. Every process and file it started is
removed on the way out, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from types import FrameType
from typing import IO, Any

from pydantic import SecretStr
from rich.console import Console
from rich.markup import escape

from hotswap.connection import connect
from hotswap.embedded import EmbeddedRedis
from hotswap.errors import HotswapError
from hotswap.redact import redact, scrub
from hotswap.settings import HotswapSettings
from hotswap.status import AgentStatus
from hotswap.store import Store
from publisher import demo_rollout, render, views
from publisher.demo_model import build
from publisher.exitcodes import INTERRUPTED, OK, for_error
from publisher.publisher import Publisher

MODEL = "tiny"
PROMPT = [5, 17, 42, 7, 99]
LAYER = "blocks.1.mlp."
NAN_TENSOR = "blocks.0.mlp.0.weight"
STEP_TIMEOUT = 30.0
INTERRUPTED_LINE = (
    "Interrupted: stopped the servers and Redis and removed the demo's keys and files."
)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


SERVER_MODULE = "publisher.demo_server"


class _Server:
    """The example server in a child process, spoken to as JSON over loopback HTTP."""

    def __init__(
        self,
        settings: HotswapSettings,
        log: IO[bytes],
        stack: contextlib.ExitStack,
        check: Callable[[], None],
        *,
        name: str,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.check, self.name = check, name
        env = {
            **os.environ,
            **_environment(settings),
            "PYTHONUNBUFFERED": "1",
            # A stable agent id (host-name): the rollout act tells its servers apart by it.
            "HOTSWAP_AGENT_NAME": name,
            **(env or {}),
        }
        env["HOTSWAP_POLL_INTERVAL"] = "1"  # a lost notice costs a second, not five
        # A Ctrl-C in a terminal also stops the embedded redis-server (same process
        # group); short retries keep the server's last status write from stalling exit.
        env["HOTSWAP_RETRY_ATTEMPTS"] = "2"
        env["HOTSWAP_RETRY_MAX_WAIT"] = "0.2"
        self._log = log
        self.base = ""
        self.process = subprocess.Popen(
            [sys.executable, "-m", SERVER_MODULE, "--model-name", MODEL, "--port", "0", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            env=env,
            text=True,
            # Out of the terminal's process group: Ctrl-C reaches only the demo,
            # which then stops the server in order (while Redis is still up).
            start_new_session=True,
        )
        stack.callback(self.stop)

    def listening(self) -> _Server:
        """Wait for the server's first line (it loads torch first); returns itself."""
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("listening on "):
            self.stop()
            raise HotswapError(f"the example server did not start: {self.errors()}")
        self.base = line.split()[-1]
        return self

    def errors(self) -> str:
        """The last lines the server wrote to stderr, for error messages."""
        self._log.seek(0)
        lines = self._log.read().decode(errors="replace").strip().splitlines()
        return " / ".join(lines[-3:]) or f"no output (run python -m {SERVER_MODULE} to see why)"

    def _call(self, request: urllib.request.Request | str) -> dict[str, Any]:
        try:
            # Only ever http://127.0.0.1:PORT as printed by our own child.
            with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310
                return dict(json.loads(reply.read()))
        except (urllib.error.URLError, OSError) as e:
            raise HotswapError(f"the example server did not answer ({e}): {self.errors()}") from e

    def get(self, path: str) -> dict[str, Any]:
        return self._call(self.base + path)

    def predict(self) -> dict[str, Any]:
        return self._call(
            urllib.request.Request(  # noqa: S310 - our child's loopback URL
                self.base + "/predict",
                data=json.dumps({"tokens": PROMPT}).encode(),
                headers={"Content-Type": "application/json"},
            )
        )

    def wait_version(self, version: int) -> tuple[float, dict[str, Any]]:
        """Seconds until the server runs ``version``, and its /version answer."""
        start = time.monotonic()
        while time.monotonic() - start < STEP_TIMEOUT:
            self.check()
            answer = self.get("/version")
            # last_apply is set just after the version flips: wait for both.
            if answer["version"] == version and answer["last_apply"].get("version") == version:
                return time.monotonic() - start, answer["last_apply"]
            time.sleep(0.02)
        raise HotswapError(f"the example server did not apply v{version} in {STEP_TIMEOUT:.0f}s")

    def stop(self) -> None:
        """SIGTERM (the server's clean shutdown), then SIGKILL if it hangs."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()


def _environment(settings: HotswapSettings) -> dict[str, str]:
    """``settings`` as HOTSWAP_* variables, so the server child runs under the same ones."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if name == "signing_keys":
            text = ",".join(key.decode() for key in settings.key_bytes())
        elif isinstance(value, SecretStr):  # the secret, not pydantic's mask
            text = value.get_secret_value()
        env[f"HOTSWAP_{name.upper()}"] = text
    return env


def _wait_rejected(store: Store, version: int, check: Callable[[], None]) -> AgentStatus:
    """The record of the server's agent once it reports ``version`` rejected."""
    deadline = time.monotonic() + STEP_TIMEOUT
    while time.monotonic() < deadline:
        check()
        alive = [record for record, live in views.agent_statuses(store) if live]
        if alive and alive[0].rejected_version == version:
            return alive[0]
        time.sleep(0.02)
    seen = [
        f"v{r.version} {r.state}, last rejected v{r.rejected_version}"
        for r, live in views.agent_statuses(store)
    ]
    raise HotswapError(
        f"the example server did not report v{version} rejected in time "
        f"(agents: {'; '.join(seen) or 'none'})"
    )


class _Interrupts:
    """Ctrl-C and SIGTERM as KeyboardInterrupt, remembered.

    Python drops a KeyboardInterrupt raised while a finalizer (``__del__``)
    runs; the flag makes the demo's next ``check()`` raise it again, so no
    Ctrl-C is lost.
    """

    def __init__(self) -> None:
        self.seen = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.seen = True
        raise KeyboardInterrupt

    def check(self) -> None:
        if self.seen:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        signals = (signal.SIGINT, signal.SIGTERM)
        try:
            saved = {s: signal.signal(s, self._handler) for s in signals}
        except ValueError:  # not the main thread: leave signals alone
            yield
            return
        try:
            yield
        finally:
            for s, handler in saved.items():
                signal.signal(s, handler)


@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    """A second Ctrl-C must not cut the cleanup short and leave processes behind."""
    try:
        saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


class _Demo:
    """The steps, sharing the server, publisher and store."""

    def __init__(
        self,
        settings: HotswapSettings,
        out: Console,
        stack: contextlib.ExitStack,
        check: Callable[[], None],
    ) -> None:
        self.out = out
        # One line per step whatever the console's width: easier to read in logs and to grep.
        self.say = functools.partial(out.print, soft_wrap=True)
        self.check = check
        client = connect(settings)
        stack.callback(client.close)
        self.store = Store(client, MODEL, namespace=settings.namespace)
        self.pub = Publisher(MODEL, settings=settings, connection=client)
        stack.callback(self.pub.close)
        self.settings, self.stack = settings, stack
        self.server = self.start_server("web-1").listening()

    def start_server(
        self, name: str, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
    ) -> _Server:
        """One more example server (call ``listening()`` on it), stopped on the way out."""
        # Anonymous file: the server's stderr for error messages, gone when closed.
        log = self.stack.enter_context(tempfile.TemporaryFile())  # noqa: SIM115 - on the stack
        return _Server(self.settings, log, self.stack, self.check, name=name, env=env, args=args)

    def run(self) -> None:
        server, pub, say = self.server, self.pub, self.say
        before = server.predict()
        say(
            f"1. Started examples/serve.py (pid {server.process.pid}) at {server.base} with "
            f"an embedded agent. No version is published yet: from its random initial "
            f"weights it answers top tokens {before['top']} for the prompt {PROMPT}."
        )

        weights = build(seed=1).state_dict()
        v1 = pub.publish(weights, message="first trained weights")
        r = pub.last_report
        took, info = server.wait_version(v1)
        a1 = server.predict()
        say(
            f"2. Published v{v1}: all {r.tensors_total} tensors, {_mb(r.bytes_uploaded)} "
            f"uploaded in {_ms(r.seconds)}. The server fetched {_mb(info['bytes_fetched'])} "
            f"and applied v{v1} {_ms(took)} after the publish returned; it now answers "
            f"{a1['top']} (before: {before['top']})."
        )

        tuned = {k: (v * 1.05 if k.startswith(LAYER) else v) for k, v in weights.items()}
        v2 = pub.publish(tuned, message=f"fine-tuned {LAYER}*")
        r = pub.last_report
        took, info = server.wait_version(v2)
        a2 = server.predict()
        say(
            f"3. Published v{v2}, a fine-tune of one layer ({LAYER}*): {r.tensors_changed} of "
            f"{r.tensors_total} tensors changed, {_mb(r.bytes_uploaded)} uploaded in "
            f"{_ms(r.seconds)}, {_mb(r.bytes_skipped)} already in Redis. The server fetched "
            f"only those {info['tensors_changed']} tensors ({_mb(info['bytes_fetched'])}) and "
            f"applied v{v2} after {_ms(took)}; it answers {a2['top']}."
        )

        broken = dict(tuned)
        broken[NAN_TENSOR] = tuned[NAN_TENSOR].clone()
        broken[NAN_TENSOR][0, 0] = float("nan")
        v3 = pub.publish(broken, message="a run that diverged")
        r = pub.last_report
        record = _wait_rejected(self.store, v3, self.check)
        a3 = server.predict()
        reasons = "; ".join(f"{name}: {', '.join(why)}" for name, why in record.rejection.items())
        same = a3["fingerprint"] == a2["fingerprint"] and a3["version"] == v2
        say(
            f"4. Published v{v3} with one NaN in {NAN_TENSOR} ({_mb(r.bytes_uploaded)} "
            f"uploaded). The agent [bold red]rejected v{v3}[/bold red]: {escape(reasons)}. "
            f"The server still answers {a3['top']} from v{a3['version']}"
            + (", the same bytes as before." if same else ", but its answer CHANGED.")
        )
        if not same:
            raise HotswapError(f"the server's answer changed although v{v3} was rejected")

        v4 = pub.rollback(to=v1, message=f"back to v{v1}")
        r = pub.last_report
        took, info = server.wait_version(v4)
        a4 = server.predict()
        exact = a4["fingerprint"] == a1["fingerprint"]
        say(
            f"5. Rolled back to v{v1}: v{v4} is a new version with v{v1}'s tensors "
            f"({_mb(r.bytes_uploaded)} uploaded, {_ms(r.seconds)}). The server fetched "
            f"{_mb(info['bytes_fetched'])} and applied v{v4} after {_ms(took)}; it answers "
            f"{a4['top']}, output fingerprint {a4['fingerprint']}: "
            + (f"bit-exactly v{v1}'s." if exact else f"NOT v{v1}'s {a1['fingerprint']}.")
        )
        if not exact:
            raise HotswapError(f"rollback to v{v1} did not restore the answer bit-exactly")

        demo_rollout.act(self, weights, head=v4)
        self.check()
        say(f"9. hotswap status {MODEL}:")
        render.print_status(self.out, views.status_view(self.store))


def _open_redis(
    settings: HotswapSettings | None, say: Callable[[str], None], stack: contextlib.ExitStack
) -> HotswapSettings:
    """The settings the demo runs under; its cleanup goes on ``stack`` first (runs last)."""
    if settings is not None:
        cfg = settings.model_copy(update={"namespace": f"hotswap-demo-{secrets.token_hex(4)}"})
        client = connect(cfg)
        stack.callback(client.close)
        # Registered before the server, so it runs after the server has stopped.
        stack.callback(Store(client, MODEL, namespace=cfg.namespace).delete_all)
        say(
            f"[bold]hotswap demo[/bold] on {escape(redact(settings.redis_url))} under the "
            f"namespace {cfg.namespace}; its keys are deleted at the end."
        )
        return cfg
    redis = EmbeddedRedis()
    # On the stack before start(): a Ctrl-C while it starts still stops it.
    stack.callback(redis.stop)
    redis.start()
    pid = redis.process.pid if redis.process else "?"
    say(f"[bold]hotswap demo[/bold] on a private redis-server (pid {pid}, port {redis.port}).")
    return HotswapSettings(redis_url=redis.url)


def run_demo(settings: HotswapSettings | None, console: Console | None = None) -> int:
    """Run the narrated demo and return its exit code (``exitcodes``; 130 when interrupted).

    Args:
        settings: None to start a private redis-server; otherwise the Redis to
            use, under a fresh namespace whose keys are deleted at the end.
        console: where the narration goes (default: stdout).
    """
    out = console or Console(highlight=False)
    say = functools.partial(out.print, soft_wrap=True)
    started = time.monotonic()
    interrupts = _Interrupts()
    stack = contextlib.ExitStack()
    try:
        with interrupts.installed():
            try:
                cfg = _open_redis(settings, say, stack)
                _Demo(cfg, out, stack, interrupts.check).run()
            finally:
                with _uninterrupted():
                    stack.close()
            interrupts.check()
    except KeyboardInterrupt:
        # Plain write, not rich: a Ctrl-C that cut a print short leaves that line in
        # rich's buffer, and the next rich print would write it a second time.
        with _uninterrupted(), contextlib.suppress(KeyboardInterrupt, OSError):
            out.file.write(f"{INTERRUPTED_LINE}\n")
            out.file.flush()
        return INTERRUPTED
    except HotswapError as e:
        # The message may quote the server's log or a piece of the URL.
        url = None if settings is None else settings.redis_url
        say(f"[red]demo failed:[/red] {escape(scrub(str(e), url))}")
        return for_error(e)
    say(
        f"[green]Demo finished in {time.monotonic() - started:.1f}s[/green]; "
        "the servers, Redis and every temporary file are gone."
    )
    return OK
