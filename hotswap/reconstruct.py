"""A tensor's bytes from full and delta blobs, verified end to end.

``Rebuild`` reaches an entry's content the way that fetches the fewest bytes
(``chain.plan_route``): from the bytes the caller runs or a full blob,
through at most ``chain.MAX_CHAIN`` deltas. Its candidates
(``hotswap.candidates``) are the version's own entry and, only when those
reach nothing, the tensor's entries in older manifests of the lineage, at
most the delta's depth plus ``HISTORY_SLACK`` versions back.

Chunk by chunk, every link of a route is decoded (``delta.decode_frame``
checks each chunk against its frame), each delta's chunk digests must hash to
the signed manifest's ``frames_digest``, and the result must hash to the
entry's digest before the caller sees it. A blob that is missing or fails a
check is dropped and the route planned again, so a Redis that lost a delta's
base makes a reader fetch full blobs; with no route left the tensor is an
IntegrityError, never wrong bytes.

Redis I/O only through the ``Blobs`` and ``Manifests`` passed in
(``BlobStore``, ``Store``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import blake3
import numpy as np

from hotswap import chain, codec, delta, patches, priority, workers
from hotswap.candidates import Candidates, History, full_stored, unknown_encoding
from hotswap.encodings import Patched
from hotswap.errors import FormatError, IntegrityError
from hotswap.frames import Blobs, Broken, LinkReader, recut, starts
from hotswap.manifest import Manifest, TensorEntry

# Older versions a reader walks beyond a delta's depth (links since its last
# full blob): versions that left the tensor unchanged, and a rollback's way
# back to the version it restores, read backwards.
HISTORY_SLACK = chain.MAX_CHAIN


Live = tuple[str, Callable[[], memoryview]]  # (digest, its bytes on the host, read when needed)


class Rebuild:
    """One tensor of one version, from whatever blobs reach it (see the module docstring).

    Args:
        blobs: the model's blob store.
        m: the version's manifest; ``entry`` must be one of its tensors.
        entry: the tensor to reconstruct.
        history: older manifests, read only when the version's own blobs reach nothing.
        where: names model and version in messages, as ``"model 'm' v7"``.

    After a call, ``fetched`` is the bytes read from Redis and ``broken``
    says which blobs were found broken on the way (and dropped), and why.
    After ``into``, ``patch`` names the only words in which the result differs
    from the live bytes, where the route started there and every frame on it
    was a sparse patch (``hotswap.patches``); None otherwise.

    Example::

        rebuild = Rebuild(store.blobs, m, entry, history=History(store, m), where="model 'm' v7")
        out = bytearray(entry.nbytes)
        rebuild.into(memoryview(out), (running_digest, lambda: codec.as_bytes(live_tensor)))
        rebuild.fetched  # the delta's bytes, for an agent at its base
    """

    def __init__(
        self,
        blobs: Blobs,
        m: Manifest,
        entry: TensorEntry,
        *,
        history: History | None = None,
        where: str,
    ) -> None:
        self.blobs, self.entry, self.history = blobs, entry, history
        self.version_where = where
        self.where = f"{where} tensor {entry.name!r}"
        self.candidates = Candidates(entry)
        self.candidates.add(entry, m.version)
        self.fetched = 0
        self.patch: patches.Where | None = None
        # Blob (digest of a full one, name of a delta; "" the live bytes) -> why dropped.
        self.broken: dict[str, str] = {}
        self._walked = history is None

    def _spans(self) -> Iterator[tuple[int, int]]:
        """Each chunk's (start, end): computed as they go, whatever size a manifest declares."""
        size, step = self.entry.nbytes, self.entry.chunk_bytes
        return ((s, min(s + step, size)) for s in range(0, size, step))

    # -- the two ways to run: into a buffer (agents), or hashed chunk by chunk (verify)

    def into(self, out: memoryview, live: Live | None = None) -> chain.Route:
        """Write the tensor's bytes into ``out`` (``entry.nbytes`` long), verified.

        ``live`` is what the caller runs (its digest, and its bytes, read only
        when a route starts there); they are read, never written.

        Returns:
            The route that produced the bytes.

        Raises:
            IntegrityError: no stored blobs reach the tensor's bytes.
            StoreUnavailable: Redis could not be reached.
        """
        cache: list[memoryview] = []

        def live_bytes() -> memoryview:
            if not cache and live is not None:
                cache.append(live[1]())
            return cache[0]

        return self._attempts(
            live[0] if live else None, lambda r: self._run_into(r, out, live_bytes)
        )

    def check(self) -> chain.Route:
        """Reconstruct the tensor from stored blobs alone, chunk by chunk, and check its
        digest: memory stays at a batch of chunks and frames (``hotswap verify``).

        Raises:
            IntegrityError: no stored blobs reach the tensor's bytes.
        """
        return self._attempts(None, self._run_hashed)

    def check_own_delta(self, route: chain.Route | None = None) -> None:
        """Check the entry's own delta blob whole: decoded backwards from the entry's
        content (its full blob, or the end of ``route``, a route from stored blobs to
        it) chunk by chunk, it must give the base's digest.

        Raises:
            IntegrityError: the delta blob is missing, malformed or not this delta.
        """
        ref = self.entry.delta
        if ref is None:
            return
        if ref.blob not in self.candidates.deltas:
            raise IntegrityError(
                unknown_encoding(self.entry, self.version_where)
                or f"{self.where}: delta blob {ref.blob[:16]}... is not named from its base "
                "and result; publish again"
            )
        own = chain.Delta(ref.base, self.entry.digest, ref.stored_bytes, blob=ref.blob)
        if full_stored(self.entry) or route is None:
            route = chain.Route(
                self.entry.digest, chain.Full(self.entry.digest, self.entry.nbytes), ()
            )
        try:
            self._run_hashed(
                chain.Route(ref.base, route.full, (*route.links, chain.Link(own, backwards=True)))
            )
        except Broken as b:
            raise b.error from None

    # -- planning, and planning again around broken blobs --------------------------

    def _attempts(self, live: str | None, run: Callable[[chain.Route], None]) -> chain.Route:
        while True:
            try:
                route = self.candidates.plan(live, self.where)
            except FormatError as e:
                if not self._walked:
                    self._walk(live)
                    continue
                raise IntegrityError(self._unreachable(e)) from e
            try:
                run(route)
            except Broken as b:
                # Each failure drops at least one blob or the live bytes: bounded.
                if not b.names - self.broken.keys():
                    raise b.error from None
                for name in b.names:
                    self.broken.setdefault(name, str(b.error))
                if "" in b.names:
                    live = None
                self.candidates.drop(b.names - {""})
                continue
            return route

    def _walk(self, live: str | None) -> None:
        """Add older versions' entries of this tensor, newest first, until a route exists
        from the live bytes, or from a full blob with no cheaper way left to find.

        Past the first full blob that makes a route, the live bytes (older
        still) can only be cheaper while the deltas read since add up to less
        than a full blob; and never more than the delta's depth plus
        ``HISTORY_SLACK`` versions are read.
        """
        self._walked = True
        ref = self.entry.delta
        limit = (ref.depth if ref is not None else 0) + HISTORY_SLACK
        beyond: int | None = None  # delta bytes read since a full blob made a route
        assert self.history is not None
        for entry, version in self.history.walk(self.entry.name, limit):
            before = set(self.candidates.deltas)
            has_full = self.candidates.add(entry, version)
            added = sum(
                s.entry.delta.stored_bytes
                for b, s in self.candidates.deltas.items()
                if b not in before and s.entry.delta is not None
            )
            if live is not None and self.candidates.touches(live) and self._routable(live):
                return
            if beyond is not None:
                beyond += added
            elif has_full and self._routable(live):
                beyond = added
            if beyond is not None and (live is None or beyond >= self.entry.nbytes):
                return

    def _routable(self, live: str | None) -> bool:
        try:
            self.candidates.plan(live, self.where)
        except FormatError:
            return False
        return True

    def _unreachable(self, e: FormatError) -> str:
        seen = dict.fromkeys(why.split("; ")[0] for why in self.broken.values())
        found = f" (found broken: {' / '.join(seen)})" if seen else ""
        why = str(e).removeprefix(f"{self.where}: ").split("; ")[0]
        return (
            f"{self.where}: cannot be reconstructed from stored blobs: {why}{found}; "
            "publish a full version"
        )

    # -- running a route -----------------------------------------------------------

    def _run_into(
        self,
        route: chain.Route,
        out: memoryview,
        live: Callable[[], memoryview],
        *,
        verify: bool = False,
    ) -> None:
        """Run ``route`` into ``out``; the tensor's digest is checked at the end.

        That final check against the signed manifest is what lets bytes
        through, so the links' chunks are not also hashed one by one (one
        hash of the result, not one a link: a late agent's chain of deltas
        decodes at the speed of the decode) unless ``verify``: the run made
        again, only after the final check failed, chunk by chunk against
        each frame's digest, to find which blob (or the live bytes) to blame.
        Every link's frames are still checked against its signed frames digest.
        """
        checked = route.full is not None
        self.patch = None
        # From the live bytes, each chunk's sparse patches say where it may differ.
        wrote: dict[int, patches.Piece | None] | None = (
            {} if route.full is None and route.links else None
        )
        if route.full is not None:
            self._read_full(route.full, out)
            if not route.links:
                return
            bases: Iterator[memoryview] = (out[s:e] for s, e in self._spans())
        else:
            source = live()
            if not route.links:
                out[:] = source  # the live bytes are the target: the final check says so
            bases = (source[s:e] for s, e in self._spans())
        hashing = codec.ChunkDigest(out, self.entry.chunk_bytes, threads=True)
        start = "" if route.full is None else route.full.digest
        self._decode(
            route,
            bases,
            dest=lambda s, e: out[s:e],
            done=lambda i, _: hashing.landed(i),
            start=start,
            checked=checked,
            parallel=self.entry.chunks > 1,  # one chunk: nothing to overlap, no thread hop
            verify=verify,
            wrote=wrote,
        )
        try:
            self._final(route, hashing.hexdigest())
        except Broken:
            if verify or not route.links:
                raise
            self._run_into(route, out, live, verify=True)
            return
        if wrote is not None:
            self.patch = patches.joined(wrote, list(self._spans()))

    def _run_hashed(self, route: chain.Route) -> None:
        if route.full is None:
            raise Broken(IntegrityError(f"{self.where}: a check starts from stored blobs only"), "")
        source = self.candidates.fulls[route.full.digest]
        start = blake3.blake3(max_threads=priority.hash_threads())
        pieces = self.blobs.stream(source.entry, source.version)
        longest = min(self.entry.chunk_bytes, self.entry.nbytes)
        bases = recut(pieces, self._spans(), longest, start, self._counted)
        result = blake3.blake3(max_threads=priority.hash_threads())
        scratch = np.empty(longest, dtype=np.uint8).data.cast("B")

        def done(_: int, chunk: memoryview) -> None:
            result.update(chunk)

        self._decode(
            route,
            bases,
            dest=lambda s, e: scratch[: e - s],
            done=done,
            start=route.full.digest,
            checked=False,
        )
        if start.hexdigest() != route.full.digest:
            raise Broken(
                IntegrityError(
                    f"{self.where}: full blob of v{source.version}: digest mismatch: the stored "
                    "bytes were altered"
                ),
                route.full.digest,
            )
        if route.links:
            self._final(route, str(result.hexdigest()))

    def _counted(self, n: int) -> None:
        self.fetched += n

    def _read_full(self, full: chain.Full, out: memoryview) -> None:
        source = self.candidates.fulls[full.digest]
        hashing = codec.ChunkDigest(out, source.entry.chunk_bytes)

        def landed(i: int, n: int) -> None:
            self.fetched += n
            hashing.landed(i, n)

        try:
            self.blobs.read_into(source.entry, out, source.version, landed)
            where = f"{self.version_where} (full blob of v{source.version})"
            codec.check_hexdigest(source.entry.name, hashing.hexdigest(), full.digest, where)
        except IntegrityError as e:
            raise Broken(e, full.digest) from e

    def _decode(
        self,
        route: chain.Route,
        bases: Iterator[memoryview],
        *,
        dest: Callable[[int, int], memoryview],
        done: Callable[[int, memoryview], None],
        start: str,
        checked: bool,
        parallel: bool = False,
        verify: bool = True,
        wrote: dict[int, patches.Piece | None] | None = None,
    ) -> None:
        """Every link of ``route`` over each chunk in turn: chunk ``i`` of the start
        (``bases``) becomes chunk ``i`` of the result in ``dest``; ``done`` sees it.

        The first link decodes from the start into ``dest`` (the same memory when
        the start is already there); a failure there blames the start when its
        chunk is not what the frame begins from and it was not ``checked`` already.
        Frames are read here, in order; with ``parallel`` (``dest`` gives every
        chunk its own memory) chunks decode in the frame pool (``hotswap.workers``)
        while later frames are read and earlier chunks are seen by ``done``.
        ``verify`` False leaves the links' chunks unhashed: the caller checks the
        whole result against the manifest. ``wrote`` gets, per chunk, where its
        links' sparse patches wrote and the words there before and after, read
        while the chunk is in cache (None for a chunk any other encoding wrote).
        """
        readers = [
            LinkReader(self.blobs, link, self.candidates.deltas[link.delta.blob])
            for link in route.links
        ]

        def run(i: int, base: memoryview, chunk: memoryview, frames: list[memoryview]) -> None:
            got: list[Patched | None] = []
            first = base
            for k, (reader, frame) in enumerate(zip(readers, frames, strict=True)):
                where = f"{self.where} chunk {i} (delta of v{reader.source.version})"
                try:
                    patched = delta.decode_frame(
                        frame,
                        base,
                        chunk,
                        backwards=reader.backwards,
                        where=where,
                        verify=verify,
                    )
                except IntegrityError as err:
                    blame = reader.blob
                    if k == 0 and not checked and not starts(frame, base, reader.backwards):
                        blame = start
                    raise Broken(err, blame) from err
                got.append(patched)
                base = chunk
            if wrote is not None:
                # Distinct keys: safe across the pool's threads.
                wrote[i] = patches.piece(patches.union(got), first, chunk)

        def jobs() -> Iterator[Callable[[], memoryview]]:
            for i, (s, e) in enumerate(self._spans()):
                try:
                    base = next(bases)
                except IntegrityError as err:
                    raise Broken(err, start) from err
                frames = []
                for reader in readers:
                    where = f"{self.where} chunk {i} (delta of v{reader.source.version})"
                    frames.append(reader.next(i, where))
                    reader.decoded(frames[-1])
                chunk = dest(s, e)
                yield functools.partial(_ran, run, i, base, chunk, frames)

        try:
            with contextlib.closing(workers.ordered(jobs(), parallel=parallel)) as chunks:
                for i, chunk in enumerate(chunks):
                    done(i, chunk)
            for reader in readers:
                reader.finish(self.where)
        finally:
            self.fetched += sum(r.fetched for r in readers)

    def _final(self, route: chain.Route, digest: str) -> None:
        if digest != route.target:
            # Every chunk matched its frame, yet not the whole: frames forged to
            # agree, or live bytes other than their digest. Drop every suspect.
            suspects = [link.delta.blob for link in route.links]
            raise Broken(
                IntegrityError(
                    f"{self.where}: reconstructed bytes hash to {digest[:16]}..., the manifest "
                    f"says {route.target[:16]}... (a delta on the way is not what it claims)"
                ),
                *suspects,
                *([""] if route.full is None else []),
            )


def _ran(
    run: Callable[[int, memoryview, memoryview, list[memoryview]], None],
    i: int,
    base: memoryview,
    chunk: memoryview,
    frames: list[memoryview],
) -> memoryview:
    """``run`` one chunk's links, then hand on the chunk they wrote."""
    run(i, base, chunk, frames)
    return chunk
