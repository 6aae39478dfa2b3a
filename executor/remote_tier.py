"""The remote tier of the task cache: asked after the local store, fed after it.

``TaskCache`` (``hitz.executor.cache``) owns one ``RemoteTier`` per run when
a remote cache is configured (docs/remote-cache.md):

- **Lookup** (``fetch``): on a local miss, ask the remote's action cache; on a
  hit, download the blobs the result names that the local store lacks
  (concurrently, every one verified) into the local store, and record the
  result locally too. The task is then restored like a local hit; the next
  run finds it locally. A blob the remote lacks or sends wrong makes that
  lookup a miss (the task runs, and its upload repairs the remote).
- **Record** (``upload``): after a successful cacheable task was stored
  locally, upload the blobs the remote lacks, then ``UpdateActionResult``,
  on a small pool of threads so the run does not wait on the network;
  ``flush`` waits for them at the end of the run, for at most ``FLUSH_S``,
  and says how many it gave up on. Uploads are best effort: an interrupted
  run (Ctrl-C, SIGTERM) drops the queued ones and cancels those in flight at
  once (``flush(drop=True)``); the server keeps no half result, since a
  result's ``UpdateActionResult`` is sent only after all its blobs.
  ``upload = false`` (or a server that refuses updates) uploads nothing.
- **Failure**: the client retries, then its breaker opens; the first error
  that is not about one blob (unreachable, refused, misconfigured) prints ONE
  warning and turns the tier off for the rest of the run. The run goes on
  with the local cache; a remote never fails a run.

The connection is made on first use, so a run whose tasks are all up to
date never touches the network.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf.message import DecodeError

from hitz.executor import store_gc
from hitz.executor.cache import check_names, check_outputs
from hitz.executor.errors import BlobMissing, CacheError
from hitz.executor.remote_config import RemoteCacheSettings, load_token, timeout_s
from hitz.executor.store import Digest, Store
from hitz.executor.store_errors import cache_io

if TYPE_CHECKING:
    from hitz.executor.remote import RemoteCache
    from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as pb

__all__ = ["FLUSH_S", "RemoteTier"]

log = logging.getLogger(__name__)

UPLOADERS = 2  # tasks' uploads in flight at once (each moves its blobs concurrently)
FLUSH_S = 120.0  # at the end of a run, how long unfinished uploads may take
DROP_S = 5.0  # after cancelling (interrupted run), how long the upload threads may take to end


class StoreSource:
    """A blob of the local store as a ByteStream upload source (read verified)."""

    def __init__(self, store: Store, digest: Digest) -> None:
        self.store = store
        self.digest = digest
        self.size = digest.size

    def chunks(self) -> Iterator[bytes]:
        return self.store.read_chunks(self.digest)


Connector = Callable[[], "RemoteCache"]


class RemoteTier:
    """See the module docstring. ``warn`` prints one warning line (the first only)."""

    def __init__(self, settings: RemoteCacheSettings, root: Path,
                 warn: Callable[[str], None] | None,
                 connect: Connector | None = None) -> None:
        assert settings.url is not None
        self.settings = settings
        self.url = settings.url
        self.root = root
        self._warn = warn
        self._connect = connect or self._default_connect
        self._client: RemoteCache | None = None
        self._lock = threading.Lock()
        self.disabled = False
        self.warning: str | None = None
        self._pool: futures.ThreadPoolExecutor | None = None
        self._pending: list[futures.Future[bool]] = []
        self._dropping = False  # an interrupted run is dropping its uploads: no warning
        self.hits: set[str] = set()  # task names served from the remote this run
        self.uploaded = 0  # results uploaded (UpdateActionResult done)

    # --- the connection -----------------------------------------------------------------

    def _default_connect(self) -> RemoteCache:
        from hitz.executor.remote import RemoteCache

        s = self.settings
        token_file = self.root / s.token_file if s.token_file else None
        token = load_token(env=s.token_env, file=token_file)
        assert s.url is not None
        return RemoteCache.connect(s.url, instance=s.instance, token=token,
                                   ca_file=str(self.root / s.ca_file) if s.ca_file else None,
                                   timeout_s=timeout_s(s.timeout_s))

    def client(self) -> RemoteCache | None:
        """The connected client, connecting on first use; None once the tier is off."""
        with self._lock:
            if self.disabled:
                return None
            if self._client is None:
                try:
                    self._client = self._connect()
                except CacheError as exc:
                    self._disable_locked(exc)
                    return None
            return self._client

    def _disable(self, exc: CacheError) -> None:
        with self._lock:
            self._disable_locked(exc)

    def _disable_locked(self, exc: CacheError) -> None:
        if self.warning is None and not self._dropping:
            self.warning = f"{exc.message}; going on with the local cache only"
            if exc.hint:
                self.warning += f"\n\nhint: {exc.hint}"
            if self._warn is not None:
                self._warn(self.warning)
        self.disabled = True

    # --- lookups ------------------------------------------------------------------------

    def fetch(self, name: str, action: Digest, store: Store,
              command: pb.Command | None = None) -> pb.ActionResult | None:
        """The remote's successful result for ``action``, with every blob it names
        now in ``store`` (and the result recorded there too); None on a miss, a
        failed result, a blob the remote lacks or sends wrong, or a tier that
        is off. Raises ``CacheUnavailable`` if the local store fails.

        A result is not verifiable like a blob: the remote says which outputs
        go where. With ``command`` (the task's), a result naming anything but
        its declared outputs is a miss; and a result whose trees hold a name
        that is not a plain file name ("..", "a/b") is always one. Either would
        write a file the task does not own, maybe outside the project."""
        from hitz.executor.remote_errors import RemoteBlobMissing
        from hitz.executor.store import CacheUnavailable

        client = self.client()
        if client is None:
            return None
        try:
            result = client.get_action_result(action)
            if result is None or result.exit_code != 0:
                return None
            if command is not None:
                check_outputs(result, command)
            self._download(client, result, store)
        except RemoteBlobMissing as exc:  # corrupt included: this result is not usable
            log.info("remote cache: %s: %s", name, exc.message)
            return None
        except (ValueError, DecodeError) as exc:
            # A result naming a malformed digest, or a "tree" that is not a
            # Tree: not something hitz can restore, so a miss.
            log.info("remote cache: %s: unusable result: %s", name, exc)
            return None
        except CacheUnavailable:
            raise
        except CacheError as exc:
            self._disable(exc)
            return None
        store.put_action_result(action, result.SerializeToString(deterministic=True))
        self.hits.add(name)
        return result

    def _download(self, client: RemoteCache, result: pb.ActionResult, store: Store) -> None:
        """Get every blob ``result`` names into ``store``: the output files, the
        trees of output directories, then the files in those trees."""
        from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as pb

        direct = [_digest(f.digest) for f in result.output_files]
        trees = [_digest(d.tree_digest) for d in result.output_directories]
        self._get(client, store, [*direct, *trees])
        files: list[Digest] = []
        for tree_digest in trees:
            tree = pb.Tree.FromString(store.read_bytes(tree_digest))
            for directory in (tree.root, *tree.children):
                check_names(directory)
                files += [_digest(f.digest) for f in directory.files]
        self._get(client, store, files)

    def _get(self, client: RemoteCache, store: Store, digests: list[Digest]) -> None:
        missing = store.missing(digests)
        if not missing:
            return
        small = [d for d in missing if client.fits_batch(d)]
        # Read concurrently, but a group at a time (not all in memory at once).
        for group in client.read_blob_groups(small):
            for data in group.values():
                store.put_bytes(data)
        for digest in missing:
            if client.fits_batch(digest):
                continue
            # Streamed to a temp file, then stored from it: a big blob never
            # sits in memory. The temp file is one of the store's own (in its
            # tmp/, locked while this process lives), so a download cut short
            # by kill -9 leaves a file the next Store on the folder sweeps.
            with cache_io(store.folder):
                fd, temp = store_gc.new_temp(os.path.join(store.root, "tmp"))
            try:
                # Writing the temp file is the local store's I/O: its errors
                # (a full disk) are the store's, not the remote's.
                with cache_io(store.folder):
                    client.download_to(digest, fd)
                store.put_file(temp)
            finally:
                with cache_io(store.folder):
                    Path(temp).unlink(missing_ok=True)
                    os.close(fd)

    # --- recording ----------------------------------------------------------------------

    def upload(self, name: str, action: Digest, result: pb.ActionResult, store: Store,
               extra: dict[Digest, bytes]) -> None:
        """Queue the upload of ``result`` (stored locally already) for ``action``:
        its blobs, taken from ``store``, and ``extra`` (the Action, Command and
        input directories), then the result. Returns at once."""
        if not self.settings.upload:
            return
        client = self.client()
        if client is None or not client.capabilities.update_enabled:
            return
        with self._lock:
            if self._pool is None:
                self._pool = futures.ThreadPoolExecutor(UPLOADERS,
                                                        thread_name_prefix="hitz-upload")
            self._pending.append(self._pool.submit(
                self._upload, client, name, action, result, store, extra))

    def _upload(self, client: RemoteCache, name: str, action: Digest,
                result: pb.ActionResult, store: Store, extra: dict[Digest, bytes]) -> bool:
        """Upload one task's result; True if the remote now has it."""
        from hitz.protos.build.bazel.remote.execution.v2 import remote_execution_pb2 as pb

        if self.disabled:
            return False
        try:
            blobs: dict[Digest, bytes | Path | StoreSource] = dict(extra)
            for f in result.output_files:
                digest = _digest(f.digest)
                blobs[digest] = StoreSource(store, digest)
            for d in result.output_directories:
                tree_digest = _digest(d.tree_digest)
                tree_bytes = store.read_bytes(tree_digest)
                blobs[tree_digest] = tree_bytes
                tree = pb.Tree.FromString(tree_bytes)
                for directory in (tree.root, *tree.children):
                    for node in directory.files:
                        digest = _digest(node.digest)
                        blobs[digest] = StoreSource(store, digest)
            client.upload_missing(blobs)
            client.update_action_result(action, result)
        except BlobMissing as exc:
            # Gone from the local store since it was recorded (evicted): this
            # result is not uploaded, the remote is not to blame.
            log.info("remote cache: not uploading :%s: %s", name, exc.message)
            return False
        except CacheError as exc:
            self._disable(exc)
            return False
        with self._lock:
            self.uploaded += 1
        log.debug("remote cache: uploaded the result of :%s", name)
        return True

    def flush(self, timeout: float = FLUSH_S, *, drop: bool = False) -> None:
        """End the tier: wait for queued uploads, at most ``timeout`` seconds in
        all, then give up on what is left, saying how many task results were
        not uploaded (the one warning); close the connection.

        ``drop=True`` (an interrupted run) waits for nothing: queued uploads
        are dropped, those in flight cancelled (``RemoteCache.abort``), and one
        warning says how many were lost. A Ctrl-C while waiting does the same,
        then goes on as a ``KeyboardInterrupt``.
        """
        with self._lock:
            pending, self._pending = self._pending, []
            pool, self._pool = self._pool, None
        try:
            if drop:
                self._drop(pending)
            elif pending:
                done, not_done = futures.wait(pending, timeout=timeout)
                for future in done:
                    exc = future.exception()
                    if exc is not None and not isinstance(exc, CacheError):
                        raise exc  # a bug: let it be seen
                if not_done:
                    from hitz.executor.remote_errors import RemoteErrorReason, RemoteUnavailable

                    self._disable(RemoteUnavailable(
                        f"remote cache {self.url} did not take {len(not_done)} task results "
                        f"within {timeout:g}s; they were not uploaded",
                        reason=RemoteErrorReason.TIMEOUT, retryable=True))
                    self._drop(list(not_done))
        except KeyboardInterrupt:
            self._drop(pending)
            raise
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
            with self._lock:
                client, self._client = self._client, None
                self.disabled = True
            if client is not None:
                client.close()

    def _drop(self, pending: list[futures.Future[bool]]) -> None:
        """Cancel ``pending`` uploads: the queued ones never start, the running
        ones see their calls cancelled (the channel is closed under them) and
        end within ``DROP_S``. Warns how many were lost, unless the run had
        its one remote warning already."""
        with self._lock:
            self._dropping = True
            self.disabled = True
            client = self._client
        for future in pending:
            future.cancel()
        if client is not None:
            client.abort()
        futures.wait(pending, timeout=DROP_S)
        lost = sum(1 for f in pending if f.cancelled() or not f.done()
                   or f.exception() is not None or not f.result())
        with self._lock:
            if not lost or self.warning is not None:
                return
            results = "1 task result was" if lost == 1 else f"{lost} task results were"
            self.warning = (f"remote cache {self.url}: the run was interrupted; "
                            f"{results} not uploaded")
        if self._warn is not None:
            self._warn(self.warning)


def _digest(wire: pb.Digest) -> Digest:
    return Digest(wire.hash, wire.size_bytes)
