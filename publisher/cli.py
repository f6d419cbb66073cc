"""The ``hotswap`` command: parses arguments and calls the library, nothing more.

Exit codes (``publisher.exitcodes``): 0 success, 1 user error (bad file,
unknown model or version, conflict, failed verification), 2 usage, 3 Redis
unreachable, 4 the fleet is not healthy (``status``; ``publish --wait`` and
``rollback``: a live agent rejected the new version or did not apply it in
time), 130 interrupted. Errors are one line on stderr
(``hotswap: error: ...``); ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console

from hotswap.errors import HotswapError
from hotswap.redact import scrub
from publisher import commands, rollout_cli
from publisher.cliargs import DEFAULT_WAIT, version, wait_option
from publisher.exitcodes import (
    INTERRUPTED,
    OK,
    UNHEALTHY,
    UNREACHABLE,
    USAGE,
    USER_ERROR,
    for_error,
)

# The rest is imported inside the commands: parsing (--help, usage errors)
# needs none of it, and torch is slow to import (docs/performance.md). Only
# publish, rollback, promote, gc, verify, export and demo import torch (through
# Publisher or the reconstruction); the other commands read through a bare Store.
if TYPE_CHECKING:
    from hotswap.connection import RedisClient
    from hotswap.settings import HotswapSettings
    from hotswap.store import Store
    from publisher.publisher import Publisher

__all__ = ["OK", "UNHEALTHY", "UNREACHABLE", "USAGE", "USER_ERROR", "build_parser", "main"]

WIDE = 200


def _shared(defaults: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after the command name."""
    p = argparse.ArgumentParser(add_help=False)
    # On subcommands the default is "not given", so a value placed before the
    # command name is not overwritten by the subcommand's default.
    d: Callable[[Any], Any] = (lambda v: v) if defaults else (lambda v: argparse.SUPPRESS)
    g = p.add_argument_group("shared options")
    g.add_argument("--redis-url", default=d(None), help="overrides HOTSWAP_REDIS_URL")
    g.add_argument("--namespace", default=d(None), help="overrides HOTSWAP_NAMESPACE")
    g.add_argument("--json", action="store_true", default=d(False), help="machine output")
    g.add_argument("--debug", action="store_true", default=d(False), help="tracebacks on error")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hotswap",
        description="Publish, inspect and roll back hot-swappable model weights in Redis.",
        parents=[_shared(True)],
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    shared = [_shared(False)]

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help_, description=help_, parents=shared)

    p = command("publish", "publish a checkpoint as a new version")
    p.add_argument("model")
    p.add_argument("path", help=".safetensors, .pt/.pth/.bin, *.index.json or a folder")
    p.add_argument("--only", action="append", metavar="GLOB", help="publish only these tensors")
    p.add_argument("-m", "--message", default="")
    p.add_argument(
        "--force",
        action="store_true",
        help="new version even if nothing changed, or if names, shapes or dtypes differ from head",
    )
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="leave these tensors out of the new version (needed to drop tensors head has); "
        "matches the checkpoint's names and the published ones",
    )
    p.add_argument(
        "--strip-prefix",
        action="append",
        default=[],
        metavar="PREFIX",
        help="remove this prefix from the checkpoint's names (module., _orig_mod., bert.); "
        "repeatable: the first that matches is removed",
    )
    p.add_argument(
        "--rename",
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="publish tensor OLD (after --strip-prefix) as NEW",
    )
    p.add_argument(
        "--dtype",
        choices=["bf16", "fp16", "fp32"],
        help="cast floating-point tensors to this dtype before publishing",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="refuse NaN/inf and norms 0.1-10x head's before uploading (Policy defaults)",
    )
    w = p.add_mutually_exclusive_group()
    wait_option(
        w,
        "wait until every live agent applied the new version, or any rejected it "
        f"(exit 4), at most SECONDS (default {DEFAULT_WAIT:g})",
    )
    w.add_argument("--no-promote", action="store_true", help="leave head: `hotswap promote` later")
    p.add_argument(
        "--follow-symlinks",
        action="store_true",
        help="read checkpoint files that are symlinks out of their folder",
    )

    p = command(
        "status", "head, and what every agent runs (exit 4: an agent rejected head or is diverged)"
    )
    p.add_argument("model")

    p = command("log", "history: publishes, rollbacks and gc runs")
    p.add_argument("model")
    p.add_argument("-n", "--count", type=int, default=50)

    p = command("show", "a version's manifest (default: head)")
    p.add_argument("model")
    p.add_argument("version", nargs="?", type=version)

    p = command("diff", "tensors that differ between two versions")
    p.add_argument("model")
    p.add_argument("a", type=version)
    p.add_argument("b", type=version)
    p.add_argument(
        "--values",
        action="store_true",
        help="read both versions' bytes for ||new-old|| and max |new-old| of changed tensors",
    )

    rollout_cli.add(command)

    p = command("rollback", "make an earlier version current (as a new version)")
    p.add_argument("model")
    p.add_argument(
        "--to",
        type=version,
        help="default: the newest earlier version that agents applied and none rejected, "
        "not retracted by a rollback and unlike head",
    )
    p.add_argument("-m", "--message", default="")
    w = p.add_mutually_exclusive_group()
    wait_option(
        w,
        "seconds to wait for every live agent to apply the rollback (default "
        f"{DEFAULT_WAIT:g}); exit 4 if any rejected it or did not in time",
    )
    w.add_argument(
        "--no-wait", action="store_true", help="return once committed; do not ask the agents"
    )

    p = command("promote", "make a version published with --no-promote head")
    p.add_argument("model")
    p.add_argument("version", type=version)
    p.add_argument("-m", "--message", default="")

    p = command("resign", "re-issue head's signed record (new issue time and expiry)")
    p.add_argument("model")

    p = command("gc", "delete old versions and unreferenced blobs")
    p.add_argument("model")
    p.add_argument("--keep", type=int, help="newest versions to keep (HOTSWAP_KEEP_VERSIONS)")
    p.add_argument("--dry-run", action="store_true", help="say what would go, delete nothing")
    p.add_argument(
        "--grace",
        type=float,
        metavar="SECONDS",
        help="delete unreferenced blobs older than this (HOTSWAP_GC_GRACE_SECONDS); 0 only "
        "when no publish is running",
    )

    p = command("verify", "re-read and re-hash every blob of a version (default: head)")
    p.add_argument("model")
    p.add_argument("version", nargs="?", type=version)

    p = command("export", "write a version's weights (default: head) to a .safetensors file")
    p.add_argument("model")
    p.add_argument("version", nargs="?", type=version)
    p.add_argument("out", metavar="OUT.safetensors")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument(
        "--allow-unsigned",
        action="store_true",
        help="export a version the signing keys do not verify (to publish it again, signed)",
    )

    command("models", "every model in the namespace, with its versions and sizes")

    p = command("delete", "delete a model: every version, blob and log entry (asks first)")
    p.add_argument("model")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask")

    command("demo", "the whole loop on an embedded Redis, no set-up needed")
    return parser


def load_settings(args: argparse.Namespace) -> HotswapSettings:
    """Settings from HOTSWAP_* and .env, with the command line on top."""
    from hotswap import settings as settings_mod

    overrides = {
        k: v
        for k, v in (("redis_url", args.redis_url), ("namespace", args.namespace))
        if v is not None
    }
    return settings_mod.load(**overrides)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN or inf: null, as for any value not known
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class Context:
    """What a command needs: settings, the two consoles and the output mode."""

    def __init__(self, args: argparse.Namespace, out: Console, err: Console) -> None:
        self.args = args
        self.out = out
        self.err = err
        self.json: bool = args.json
        self._settings: HotswapSettings | None = None

    def settings(self) -> HotswapSettings:
        if self._settings is None:
            self._settings = load_settings(self.args)
        return self._settings

    def override(self, **values: Any) -> None:
        """Settings from a command's own options (``gc --grace``) on top of the rest."""
        self._settings = self.settings().model_copy(update=values)

    def publisher(self, require: bool = False) -> Publisher:
        """The model's Publisher; with ``require``, NotFound unless the model exists."""
        from hotswap import catalog
        from publisher.publisher import Publisher

        pub = Publisher(self.args.model, settings=self.settings())
        if require:
            try:
                catalog.require(pub.store)
            except BaseException:
                pub.close()
                raise
        return pub

    @contextmanager
    def client(self) -> Iterator[tuple[RedisClient, HotswapSettings]]:
        """A Redis client from the settings (closed after), with the settings."""
        from hotswap.connection import connect

        settings = self.settings()
        client = connect(settings)
        try:
            yield client, settings
        finally:
            client.close()

    @contextmanager
    def store(self) -> Iterator[Store]:
        """The model's store, built as ``Publisher`` builds it but without torch;
        NotFound (naming the closest models) if the model is not in Redis."""
        from hotswap import catalog, keys
        from hotswap.store import Store

        # Same order as Publisher: a bad name is reported before a bad setting.
        model = keys.check_name(self.args.model)
        with self.client() as (client, settings):
            store = Store.from_settings(client, model, settings)
            catalog.require(store)
            yield store

    def error(self, text: str) -> None:
        """Write ``text`` to stderr with every secret of the Redis URLs in play masked.

        An error or traceback may quote a URL, or a piece of one (redis-py's
        parser complaining about a port); whichever URL this run was given,
        on the command line, in the environment or in ``.env``, its password
        never reaches the terminal or a log that collects stderr.
        """
        urls = [self.args.redis_url, os.environ.get("HOTSWAP_REDIS_URL")]
        if self._settings is not None:
            urls.append(self._settings.redis_url)
        sys.stderr.write(scrub(text, *urls))

    def emit(self, data: Any, human: Callable[[], None]) -> None:
        if self.json:
            # Straight to stdout: rich would wrap long lines at the console width.
            text = json.dumps(_jsonable(data), indent=2, allow_nan=False)
            self.out.file.write(text + "\n")
        else:
            human()

    def bars(self) -> Any:
        from publisher import render

        return render.progress_bars(self.err, self.out.is_terminal and not self.json)


def cmd_publish(ctx: Context) -> int:
    from hotswap.validate import Policy
    from publisher import render
    from publisher.mapping import rename_pairs

    a = ctx.args
    with ctx.publisher() as pub, ctx.bars() as bars:
        pub.publish(
            a.path,
            message=a.message,
            only=a.only,
            force=a.force,
            progress=bars,
            exclude=a.exclude,
            follow_symlinks=a.follow_symlinks,
            strip_prefix=a.strip_prefix,
            rename=rename_pairs(a.rename) or None,
            dtype=a.dtype,
            check=Policy() if a.check else None,
            promote=not a.no_promote,
        )
        r = pub.last_report
        fleet = None if a.wait is None else commands.await_fleet(ctx, pub.store, r.version, a.wait)
    promoted = not (r.created and a.no_promote)  # nothing changed: head is that version
    data = {**render.report_data(pub.model, r), "promoted": promoted}
    data["fleet"] = None if fleet is None else fleet.data
    ctx.emit(data, lambda: commands.print_report(ctx, pub.model, r, fleet, not a.no_promote))
    return OK if fleet is None else fleet.code


COMMANDS: dict[str, Callable[[Context], int]] = {
    "rollout": rollout_cli.run,
    "publish": cmd_publish,
    "status": commands.status,
    "log": commands.log,
    "show": commands.show,
    "diff": commands.diff,
    "rollback": commands.rollback,
    "promote": commands.promote,
    "resign": commands.resign,
    "gc": commands.gc,
    "verify": commands.verify,
    "export": commands.export,
    "models": commands.models,
    "delete": commands.delete,
    "demo": commands.demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``hotswap`` command line; returns the exit code."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0) if isinstance(e.code, int) or e.code is None else USAGE
    # Off a terminal rich would squeeze tables into 80 columns and cut digests.
    wide = None if sys.stdout.isatty() else WIDE
    out = Console(highlight=False, width=wide)
    err = Console(stderr=True, highlight=False)
    ctx = Context(args, out, err)
    try:
        return COMMANDS[args.command](ctx)
    except HotswapError as e:
        code = for_error(e)
        if args.debug:
            ctx.error(traceback.format_exc())
        ctx.error(f"hotswap: error: {e}\n")
        return code
    except KeyboardInterrupt:
        print("hotswap: interrupted", file=sys.stderr)
        return INTERRUPTED
    except Exception as e:
        # A bug, not a user error: still one line unless --debug asks for more.
        if args.debug:
            ctx.error(traceback.format_exc())
            ctx.error(f"hotswap: internal error: {type(e).__name__}: {e}\n")
        else:
            ctx.error(
                f"hotswap: internal error: {type(e).__name__}: {e} (run with --debug for "
                "the traceback)\n"
            )
        return USER_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
