"""Is the Ray cluster a job names there at all? Checked at plan time, before anything is
written: ray.init on an address that nobody answers waits for minutes (a plain
host:port) or retries for over a minute before a traceback (ray://host:port).

Only a TCP connect to host:port: a reachable port that is not Ray's still fails later,
in ray.init. "auto", "local" and other forms (Ray's client-builder schemes) are left to
Ray.
"""
from __future__ import annotations

import os
import socket

from jobs.spec import JobSpec, SpecError

CONNECT_TIMEOUT_S = 5.0
RAY_CLIENT_PORT = 10001     # Ray Client's default (ray://host without a port)
_LEFT_TO_RAY = ("auto", "local")


def ray_address(spec: JobSpec) -> tuple[str, str] | None:
    """(address, where it came from) that the driver joins (driver.ensure_ray), or None
    for a private local Ray."""
    if spec.compute.ray_address:
        return spec.compute.ray_address, "compute.ray_address"
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"], "$RAY_ADDRESS"
    return None


def _host_port(address: str, where: str) -> tuple[str, int] | None:
    """(host, port) of `host:port` or `ray://host[:port]`; None for forms left to Ray."""
    if address in _LEFT_TO_RAY:
        return None
    client = address.startswith("ray://")
    rest = address[len("ray://"):] if client else address
    if "://" in rest:
        return None
    rest = rest.rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep and client:
        host, port = rest, str(RAY_CLIENT_PORT)
    host = host.strip("[]")   # [::1]:6379
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in host:
        raise SpecError(f"{where}: {address!r}: expected host:port, ray://host:port, auto or local")
    return host, int(port)


def check_ray_address(spec: JobSpec, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """A SpecError naming compute.ray_address (or $RAY_ADDRESS) when nothing accepts a
    connection at its host and port within `timeout` seconds."""
    found = ray_address(spec)
    if found is None:
        return
    address, where = found
    target = _host_port(address, where)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout):
            pass
    except socket.timeout:
        raise SpecError(f"{where}: cannot reach a Ray cluster at {address} (no answer within "
                        f"{timeout:g} s)") from None
    except socket.gaierror:
        raise SpecError(f"{where}: cannot reach a Ray cluster at {address} (unknown host "
                        f"{target[0]})") from None
    except OSError as e:
        raise SpecError(f"{where}: cannot reach a Ray cluster at {address} "
                        f"({e.strerror or type(e).__name__})") from None
