"""The listening socket of ``kaika serve`` and ``kaika webui``, bound before the model loads."""

from __future__ import annotations

import socket

from kaika.errors import KaikaError


def check_port_free(host: str, port: int, what: str):
    """Bind ``host:port`` now (before minutes of model loading) and return the listening socket,
    or fail with the reason: a port outside 1–65535, one in use, or a host that is not this machine's."""
    if not 0 < port < 65536:
        raise KaikaError(f"{what}: --port must be between 1 and 65535, got {port}")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise KaikaError(f"{what}: --host {host} cannot be resolved ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: no TIME_WAIT refusals
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        hint = " (another server is listening there: stop it or pass another --port)" if e.errno == 98 else ""
        raise KaikaError(f"{what}: cannot listen on {host}:{port}: {e.strerror}{hint}") from None
    return sock
