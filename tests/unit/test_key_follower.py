"""The phase loop's long-lived watch of one key (`etcd_watch.KeyFollower`) against a fake etcd client: the
newest value first, every later one in order, and this process's own writes taken at once, never twice."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

from checkpoint_engine.etcd_watch import KeyFollower

LOG = logging.LoggerAdapter(logging.getLogger("test"), {})


class FakeEtcd:
    def __init__(self, value: bytes, revision: int) -> None:
        self.value, self.revision = value, revision
        self.callbacks: dict[int, Any] = {}
        self.reads = 0

    def get_response(self, key: str) -> SimpleNamespace:
        self.reads += 1
        kvs = [SimpleNamespace(value=self.value)]
        return SimpleNamespace(kvs=kvs, count=1, header=SimpleNamespace(revision=self.revision))

    def add_watch_callback(self, key: str, callback: Any, start_revision: int) -> int:
        self.callbacks[len(self.callbacks)] = callback
        return len(self.callbacks) - 1

    def cancel_watch(self, watch_id: int) -> None:
        del self.callbacks[watch_id]

    def put(self, value: bytes) -> None:
        """A write someone made: its event reaches every watch."""
        self.revision += 1
        event = SimpleNamespace(key=b"k", value=value, mod_revision=self.revision)
        for callback in list(self.callbacks.values()):
            callback(SimpleNamespace(events=[event]))


def test_the_newest_value_first_then_each_later_one_through_one_watch() -> None:
    etcd = FakeEtcd(b"a", revision=5)
    follower = KeyFollower(etcd, "k", LOG)  # type: ignore[arg-type]
    assert follower.wait(lambda v: v, timeout=0.1) == b"a"
    etcd.put(b"b")
    etcd.put(b"c")  # both written while nobody waited: the next wait starts from the newest
    assert follower.wait(lambda v: v, timeout=0.1) == b"c"
    judged: list[bytes | None] = []

    def until_e(v: bytes | None) -> bytes | None:
        judged.append(v)
        return v if v == b"e" else None

    etcd.put(b"d")
    etcd.put(b"e")
    assert follower.wait(until_e, timeout=0.1) == b"e"
    assert judged == [b"e"]  # caught up to the newest first; nothing older judged
    assert (etcd.reads, len(etcd.callbacks)) == (1, 1)  # one read, one watch, for every wait
    assert follower.wait(lambda v: v if v == b"z" else None, timeout=0.05) is None
    follower.close()
    assert not etcd.callbacks


def test_its_own_write_is_the_newest_value_at_once_and_its_event_is_not_taken_again() -> None:
    etcd = FakeEtcd(b"a", revision=5)
    follower = KeyFollower(etcd, "k", LOG)  # type: ignore[arg-type]
    follower.wait(lambda v: v, timeout=0.1)
    follower.wrote(b"b", 6)  # the leader's advance: the watch has not delivered it yet
    assert follower.wait(lambda v: v, timeout=0.0) == b"b"
    etcd.put(b"b")  # its event (revision 6) arrives late, then someone's next write
    etcd.put(b"c")
    judged: list[bytes | None] = []
    assert follower.wait(lambda v: judged.append(v) or (v if v == b"c" else None), timeout=0.1) == b"c"
    assert judged == [b"c"]
