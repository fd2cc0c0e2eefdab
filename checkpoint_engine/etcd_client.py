"""The etcd connection every coordinating process uses: endpoint parsing and a client that gives up in time.

Consumes: an endpoint string "HOST:PORT" (from the config, or the launcher's local etcd).
Produces: a `pyetcd` client. pyetcd is imported only when a client is made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyetcd


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """Split "HOST:PORT"; a scheme, a path or a bad port is rejected here rather than as a gRPC hang."""
    host, sep, port_text = endpoint.rpartition(":")
    expected = "expected HOST:PORT, e.g. 127.0.0.1:2379 (no scheme, no path)"
    if not sep or not host or "/" in endpoint:
        raise ValueError(f"bad etcd endpoint {endpoint!r}: {expected}")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad etcd endpoint {endpoint!r}: port {port_text!r} is not in 1..65535; {expected}")
    return host, int(port_text)


def connect(endpoint: str, timeout: float = 5.0) -> pyetcd.MultiEndpointEtcd3Client:
    """A pyetcd client whose every call gives up after `timeout` seconds.

    pyetcd's `client()` marks its only endpoint failed for 300 s after one UNAVAILABLE answer and
    then raises "Trying to use a failed node" without trying; `time_retry=0` lets a coordinator
    ride out an etcd restart or a start-up race instead.
    """
    import pyetcd

    host, port = parse_endpoint(endpoint)
    node = pyetcd.Endpoint(host, port, secure=False, time_retry=0.0)
    return pyetcd.MultiEndpointEtcd3Client(endpoints=[node], timeout=timeout)
