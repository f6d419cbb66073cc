"""The ``hotswap`` commands other than ``publish``: each parses nothing,
calls the library and prints (``--json``: the data, typed; else tables and lines).

Every command that reads a model first checks that it exists
(``hotswap.catalog.require``): a misspelled name is an error (exit 1) naming
the closest models, never an empty answer.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hotswap.errors import ConfigError, IntegrityError, NotFound
from publisher.exitcodes import OK, UNHEALTHY

if TYPE_CHECKING:
    from hotswap.store import Store
    from publisher.cli import Context
    from publisher.reports import PublishReport


def _version_or_head(store: Store, version: int | None) -> int:
    if version is not None:
        return version
    head = store.head()
    if head is None:
        raise NotFound(f"model {store.model!r} has no versions (nothing published yet)")
    return head


def status(ctx: Context) -> int:
    from publisher import render, views

    with ctx.store() as store:
        data = views.status_view(store, signing_keys=ctx.settings().key_bytes())
    ctx.emit(data, lambda: render.print_status(ctx.out, data))
    return OK if data["healthy"] else UNHEALTHY


def log(ctx: Context) -> int:
    from publisher import history

    with ctx.store() as store:
        rows = store.log(ctx.args.count)
    ctx.emit(history.log_data(rows), lambda: ctx.out.print(history.log_table(store.model, rows)))
    return OK


def show(ctx: Context) -> int:
    from publisher import showing

    with ctx.store() as store:
        version = _version_or_head(store, ctx.args.version)
        m = store.manifest(version, ctx.settings().key_bytes())
    ctx.emit(showing.manifest_data(m), lambda: ctx.out.print(showing.manifest_table(m)))
    return OK


def diff(ctx: Context) -> int:
    from publisher import showing

    with ctx.store() as store:
        keys = ctx.settings().key_bytes()
        a, b = store.manifest(ctx.args.a, keys), store.manifest(ctx.args.b, keys)
        far = None
        if ctx.args.values:
            from publisher import plan, valuediff

            changed = plan.diff(a.tensors, b.tensors).changed
            far = valuediff.distances(store, a, b, changed, keys)
    data = showing.diff_data(a, b, far)
    ctx.emit(data, lambda: ctx.out.print(showing.diff_table(data)))
    return OK


@dataclass(frozen=True)
class Waited:
    """What ``--wait`` found (``publisher.await_fleet``): JSON, lines and the exit code."""

    data: dict[str, Any]
    lines: list[str]
    code: int


def await_fleet(ctx: Context, store: Store, version: int, timeout: float) -> Waited:
    """Wait for the live agents to take ``version`` (at most ``timeout`` seconds)."""
    from publisher import await_fleet as af

    if ctx.out.is_terminal and not ctx.json:
        ctx.err.print(f"waiting up to {timeout:g} s for the live agents to apply v{version}")
    r = af.wait(store, version, timeout)
    return Waited(af.data(r), af.lines(r), OK if r.ok else UNHEALTHY)


def print_report(
    ctx: Context, model: str, r: PublishReport, fleet: Waited | None, promoted: bool = True
) -> None:
    """A publish's or rollback's lines: what it made, why (rollback), what agents did;
    a version not ``promoted`` says that head stayed where it was."""
    from publisher import render

    line = render.report_line(model, r)
    if r.created and not promoted:
        head = "empty" if r.parent is None else f"v{r.parent}"
        line = render.plain(
            f"{line}; not head: agents stay on {head} until `hotswap promote {model} {r.version}`"
        )
    ctx.out.print(line, soft_wrap=True)  # one line, however long: scripts grep it
    why = render.rollback_why(model, r) if r.kind == "rollback" else None
    if why is not None:
        ctx.out.print(why)
    for line in fleet.lines if fleet is not None else []:
        # Reasons and agent ids come from agents' records: plain text.
        ctx.out.print(render.plain(line))


def rollback(ctx: Context) -> int:
    from publisher import render
    from publisher.await_fleet import DEFAULT_TIMEOUT

    a = ctx.args
    with ctx.publisher(require=True) as pub:
        pub.rollback(to=a.to, message=a.message)
        r = pub.last_report
        # A rollback is an emergency: it waits unless told not to, so that exit 0
        # means the live agents run it.
        timeout = DEFAULT_TIMEOUT if a.wait is None else a.wait
        fleet = None if a.no_wait else await_fleet(ctx, pub.store, r.version, timeout)
    data = {**render.report_data(pub.model, r), "fleet": None if fleet is None else fleet.data}
    ctx.emit(data, lambda: print_report(ctx, pub.model, r, fleet))
    return OK if fleet is None else fleet.code


def promote(ctx: Context) -> int:
    a = ctx.args
    with ctx.publisher(require=True) as pub:
        pub.promote(a.version, message=a.message)
        done = pub.last_promotion
    if done is None:  # promote always sets it; the type cannot say so
        raise RuntimeError("promote left no record")
    was = "empty" if done.previous is None else f"v{done.previous}"
    line = (
        f"model {pub.model}: promoted v{done.version} to head (was {was}); agents apply it"
        if done.moved
        else f"model {pub.model}: v{done.version} is already head; nothing changed"
    )
    data = {"model": pub.model, "version": done.version, "previous": done.previous}
    ctx.emit({**data, "moved": done.moved}, lambda: ctx.out.print(line, markup=False))
    return OK


def resign(ctx: Context) -> int:
    with ctx.publisher(require=True) as pub:
        r = pub.resign()
    data = {
        "model": r.model,
        "version": r.version,
        "lineage": r.lineage,
        "manifest": r.manifest,
        "issued": r.issued,
        "expires": r.expires,
    }
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.issued))
    until = "no expiry" if r.expires is None else f"expires in {r.expires - r.issued:.0f} s"
    line = f"model {r.model}: re-signed head v{r.version}, issued {when}, {until}"
    ctx.emit(data, lambda: ctx.out.print(line))
    return OK


def gc(ctx: Context) -> int:
    from publisher import render

    if ctx.args.grace is not None:
        if ctx.args.grace < 0:
            raise ConfigError(f"--grace must be 0 or more seconds, got {ctx.args.grace:g}")
        ctx.override(gc_grace_seconds=ctx.args.grace)
    with ctx.publisher(require=True) as pub:
        r = pub.gc(keep=ctx.args.keep, dry_run=ctx.args.dry_run)
    line = render.gc_line(pub.model, r, ctx.settings().namespace)
    # One line, however long: scripts grep it.
    ctx.emit(render.gc_data(pub.model, r), lambda: ctx.out.print(line, soft_wrap=True))
    return OK


def verify(ctx: Context) -> int:
    from publisher import render

    with ctx.publisher(require=True) as pub, ctx.bars() as bars:
        r = pub.verify(ctx.args.version, progress=bars)
    data = render.verify_data(pub.model, r)
    if ctx.json:
        ctx.emit(data, lambda: None)
    elif r.ok:
        ctx.out.print(
            f"model {pub.model} v{r.version}: all {r.tensors_checked} tensors verified "
            f"({render.size(r.bytes_checked)} re-hashed in {r.seconds:.2f}s)"
        )
    if r.ok:
        return OK
    name, why = next(iter(r.bad.items()))
    more = f" and {len(r.bad) - 1} more" if len(r.bad) > 1 else ""
    raise IntegrityError(
        f"model {pub.model!r} v{r.version}: {len(r.bad)} of {r.tensors_checked} tensors failed "
        f"verification: {name!r}{more} ({why}); publish those weights again"
    )


def export(ctx: Context) -> int:
    from dataclasses import asdict

    from publisher import export as ex
    from publisher import render

    a = ctx.args
    with ctx.store() as store, ctx.bars() as bars:
        version = _version_or_head(store, a.version)
        r = ex.export(
            store,
            version,
            Path(a.out),
            keys=ctx.settings().key_bytes(),
            allow_unsigned=a.allow_unsigned,
            overwrite=a.force,
            progress=bars,
        )
    signed = "" if r.signed or not ctx.settings().key_bytes() else " (not signed: read anyway)"
    line = (
        f"model {store.model}: exported v{r.version}{signed} to {r.path}: {r.tensors} tensors, "
        f"{render.size(r.bytes)} ({r.seconds:.2f}s)"
    )
    ctx.emit({"model": store.model, **asdict(r)}, lambda: ctx.out.print(line, markup=False))
    return OK


def models(ctx: Context) -> int:
    from publisher import inventory

    with ctx.client() as (client, settings):
        rows = inventory.rows(client, settings)
    ctx.emit(rows, lambda: ctx.out.print(inventory.table(settings.namespace, rows)))
    return OK


def delete(ctx: Context) -> int:
    from hotswap import catalog
    from publisher import inventory

    with ctx.store() as store:
        row = inventory.row(store)
        if not ctx.args.yes and not _confirmed(ctx, inventory.describe(row)):
            raise ConfigError(f"model {store.model!r}: nothing deleted (answer y, or pass --yes)")
        deleted = catalog.delete_model(store)
    data = {**row, "keys_deleted": deleted}
    line = f"model {store.model}: deleted {deleted} keys ({inventory.describe(row)})"
    ctx.emit(data, lambda: ctx.out.print(line, markup=False))
    return OK


def _confirmed(ctx: Context, what: str) -> bool:
    """Ask on stderr, read the answer from stdin (a pipe may answer: ``yes | hotswap ...``)."""
    ctx.err.print(f"delete {what}? every version and blob goes [y/N] ", end="", markup=False)
    answer = sys.stdin.readline()
    if not answer:
        ctx.err.print()
    return answer.strip().lower() in ("y", "yes")


def demo(ctx: Context) -> int:
    from publisher.demo import run_demo

    settings = ctx.settings()
    # A Redis named anywhere (--redis-url, HOTSWAP_REDIS_URL or HOTSWAP_SENTINELS in
    # the environment or in .env) is used under a namespace of the demo's own; else
    # a private one.
    given = bool({"redis_url", "sentinels"} & settings.model_fields_set)
    return int(run_demo(settings if given else None, ctx.out))
