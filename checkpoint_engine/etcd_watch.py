"""The one watch loop behind every coordination wait (phase, acks, shards, nodes, the leader seat).

Consumes: a pyetcd client; the keys to watch (one ending in '/' is watched as a prefix, any other as
that exact key); `read`, the wait's fresh read, which returns its result (None: not yet) and the store
revision it saw; `handle`, which turns each batch of watch events into a result (None: not yet).
Produces: the first result, or None once the timeout runs out.
Waits on: etcd watch callbacks through a queue, never busy polling.

Watches start at the revision after `read`'s, so nothing written between the read and the wait is
missed, and `handle` sees every event of every key once, in revision order.

The one policy for a broken watch stream (pyetcd hands every watch of the stream the gRPC error,
or None when the stream just ended): log it, pause briefly, and re-open each watch from the
revision after the last event it delivered, so that no event is lost or repeated. Only when etcd
has compacted that revision away does the wait start over from `read`. Re-opening while etcd is out
of reach raises pyetcd's ConnectionFailedError, as every other request does.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import pyetcd

REWATCH_PAUSE = 0.2  # seconds between a broken stream and re-opening its watches
T = TypeVar("T")
Event = Any  # pyetcd.events.PutEvent or DeleteEvent: .key, .value, .mod_revision


def brief(exc: object) -> str:
    """One line for an etcd error; gRPC's own repr spans several."""
    details = getattr(exc, "details", None)
    return f"{type(exc).__name__}: {details() if callable(details) else exc}"


class _Compacted(Exception):
    """A watch cannot resume: etcd compacted away the revision it must start from."""


def _is_break(item: object) -> bool:
    """An error or None: the stream is gone (a WatchResponse has events; a compaction error only ends its watch)."""
    return not hasattr(item, "events") and not hasattr(item, "compacted_revision")


class _Watches:
    """One watch per key, all feeding one queue; remembers per key the next revision to deliver."""

    def __init__(
        self, client: pyetcd.MultiEndpointEtcd3Client, keys: Sequence[str], log: logging.LoggerAdapter
    ) -> None:
        self.client, self.keys, self.log = client, list(keys), log
        self.next_revision: dict[str, int] = {}
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._ids: list[int] = []

    def open(self, revision: int | None = None) -> None:
        """Watch every key from its next revision (from `revision`, when given)."""
        from pyetcd.exceptions import RevisionCompactedError

        if revision is not None:
            self.next_revision = dict.fromkeys(self.keys, revision)
        # A fresh queue: whatever the old watches still deliver goes to the old one, unread.
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._events = events
        try:
            for key in self.keys:
                self._ids.append(self._add(key, lambda item, k=key: events.put((k, item))))
        except RevisionCompactedError as exc:
            self.close()
            raise _Compacted(brief(exc)) from exc

    def _add(self, key: str, callback: Callable[[Any], None]) -> int:
        start = self.next_revision[key]
        if key.endswith("/"):
            return self.client.add_watch_prefix_callback(key, callback, start_revision=start)
        return self.client.add_watch_callback(key, callback, start_revision=start)

    def close(self, *, broken: bool = False) -> None:
        """Cancel the watches, unless their stream broke: pyetcd dropped them then, and numbers
        watches afresh on the next stream, so an old id may name another caller's new watch."""
        broken = broken or any(_is_break(item) for _, item in list(self._events.queue))
        if not broken:
            for watch_id in self._ids:
                self.client.cancel_watch(watch_id)
        self._ids = []

    def next_batch(self, deadline: float) -> list[Event] | None:
        """The events that arrived next (a burst at once, in revision order), or None at the deadline."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                items = [self._events.get(timeout=remaining)]
            except queue.Empty:
                return None
            while not self._events.empty():  # one `handle` answers a burst
                items.append(self._events.get_nowait())
            batch, breaks, compacted = [], [], []
            for key, item in items:
                if _is_break(item):
                    breaks.append(ConnectionError("watch stream ended") if item is None else item)
                elif not hasattr(item, "events"):
                    compacted.append(item)
                else:
                    fresh = [e for e in item.events if e.mod_revision >= self.next_revision[key]]
                    if fresh:
                        self.next_revision[key] = fresh[-1].mod_revision + 1
                    batch += fresh
            if breaks:
                self._resume(breaks[0], deadline)
            elif compacted:  # pyetcd cancelled that watch itself; the other watches still run
                self.close()
                raise _Compacted(brief(compacted[0]))
            if batch:
                return sorted(batch, key=lambda e: e.mod_revision)

    def _resume(self, error: object, deadline: float) -> None:
        resume_at = ", ".join(f"{k} at {r}" for k, r in self.next_revision.items())
        self.log.warning("watch stream broke (%s); re-watching %s", brief(error), resume_at)
        self.close(broken=True)
        time.sleep(max(min(REWATCH_PAUSE, deadline - time.monotonic()), 0.0))
        self.open()


def watch_until(
    client: pyetcd.MultiEndpointEtcd3Client,
    keys: Sequence[str],
    read: Callable[[], tuple[T | None, int]],
    handle: Callable[[list[Event]], T | None],
    *,
    timeout: float,
    log: logging.LoggerAdapter,
) -> T | None:
    """`read`'s result if it has one; else the first result of `handle` on the events under `keys`,
    or None after `timeout` seconds (a timeout <= 0 only reads)."""
    deadline = time.monotonic() + timeout
    result, revision = read()
    if result is not None or timeout <= 0:
        return result
    watches = _Watches(client, keys, log)
    try:
        while True:
            try:
                watches.open(revision + 1)
                while (batch := watches.next_batch(deadline)) is not None:
                    if (result := handle(batch)) is not None:
                        return result
                return None
            except _Compacted as exc:
                log.warning("watch of %s cannot resume (%s); reading afresh", ", ".join(keys), exc)
                result, revision = read()
                if result is not None:
                    return result
    finally:
        watches.close()
