"""The etcd connection every coordinating process uses: endpoint parsing and a client that gives up in time.

Consumes: an endpoint string "HOST:PORT" (from the config, or the launcher's local etcd).
Produces: a `pyetcd` client; with `outage` > 0, one whose requests ride out etcd being out of reach for up
to that long (the launcher starts a job's etcd again on its data directory when it dies). pyetcd is
imported only when a client is made.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pyetcd

log = logging.getLogger(__name__)

# The client's requests; anything else (`transactions`, `close`, ...) is passed through as it is.
_REQUESTS = frozenset(
    {
        "get",
        "get_prefix",
        "get_response",
        "put",
        "delete",
        "delete_prefix",
        "transaction",
        "lease",
        "revoke_lease",
        "add_watch_callback",
        "add_watch_prefix_callback",
    }
)
_RETRY_PAUSE = 0.25  # seconds between tries while etcd is out of reach


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """Split "HOST:PORT"; a scheme, a path or a bad port is rejected here rather than as a gRPC hang."""
    host, sep, port_text = endpoint.rpartition(":")
    expected = "expected HOST:PORT, e.g. 127.0.0.1:2379 (no scheme, no path)"
    if not sep or not host or "/" in endpoint:
        raise ValueError(f"bad etcd endpoint {endpoint!r}: {expected}")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad etcd endpoint {endpoint!r}: port {port_text!r} is not in 1..65535; {expected}")
    return host, int(port_text)


def lease_not_found(exc: BaseException) -> bool:
    """Whether a request failed because the lease it named is gone (revoked, or expired before the heartbeat
    noticed); pyetcd passes gRPC's NOT_FOUND through as it is."""
    code = getattr(exc, "code", None)
    return callable(code) and getattr(code(), "name", "") == "NOT_FOUND"


def connect(endpoint: str, timeout: float = 5.0, outage: float = 0.0) -> pyetcd.MultiEndpointEtcd3Client:
    """A pyetcd client whose every call gives up after `timeout` seconds, tried again while etcd is out of
    reach for up to `outage` seconds.

    pyetcd's `client()` marks its only endpoint failed for 300 s after one UNAVAILABLE answer and
    then raises "Trying to use a failed node" without trying; `time_retry=0` lets a coordinator
    ride out an etcd restart or a start-up race instead.
    """
    import pyetcd

    host, port = parse_endpoint(endpoint)
    node = pyetcd.Endpoint(host, port, secure=False, time_retry=0.0)
    client = pyetcd.MultiEndpointEtcd3Client(endpoints=[node], timeout=timeout)
    return _RidesOutOutages(client, endpoint, outage) if outage > 0 else client


class _RidesOutOutages:
    """A pyetcd client whose requests are tried again while etcd is out of reach, for up to `outage` seconds
    from the first failure, then fail as before. A request that failed may still have been applied: the
    callers' writes are idempotent puts and compare-and-swaps, which a repeat cannot apply twice."""

    def __init__(self, client: pyetcd.MultiEndpointEtcd3Client, endpoint: str, outage: float) -> None:
        self._client, self._endpoint, self._outage = client, endpoint, outage
        self._given_up = threading.Event()

    def give_up(self) -> None:
        """From now on (and in the requests waiting now) an unreachable etcd fails at once: its owner is stopping."""
        self._given_up.set()

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._client, name)
        return self._patient(name, value) if name in _REQUESTS else value

    def __enter__(self) -> _RidesOutOutages:
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.close()

    def _patient(self, name: str, request: Callable[..., Any]) -> Callable[..., Any]:
        import pyetcd.exceptions as errors

        # WatchTimedOut: a watch asked for on a stream that broke gets no answer.
        unreachable = (
            errors.ConnectionFailedError,
            errors.ConnectionTimeoutError,
            errors.NoServerAvailableError,
            errors.WatchTimedOut,
        )

        def call(*args: Any, **kwargs: Any) -> Any:
            first_failure = None
            while True:
                try:
                    result = request(*args, **kwargs)
                except unreachable as e:
                    now = time.monotonic()
                    if first_failure is None:
                        first_failure = now
                        log.warning(
                            "etcd at %s is out of reach (%s: %s); trying again for up to %g s",
                            self._endpoint,
                            name,
                            type(e).__name__,
                            self._outage,
                        )
                    if now - first_failure >= self._outage or self._given_up.wait(_RETRY_PAUSE):
                        raise
                    continue
                if first_failure is not None:
                    log.warning(
                        "etcd at %s answers again after %.1f s", self._endpoint, time.monotonic() - first_failure
                    )
                return result

        return call
