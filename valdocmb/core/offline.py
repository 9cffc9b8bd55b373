"""Inference never needs the network: while `no_network()` is active, any attempt to open an internet socket
(a model download by a library, a telemetry ping) fails at once with an error that says why."""

from __future__ import annotations

import contextlib
import socket


class NetworkRefused(OSError):
    pass


@contextlib.contextmanager
def no_network():
    original_connect, original_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def refuse(sock, address, *_):
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            raise NetworkRefused(f"valdocmb runs offline: refused a network connection to {address!r} "
                                 "(a library tried to download something; every file must be in the image)")
        return None

    def connect(sock, address):
        refuse(sock, address)
        return original_connect(sock, address)

    def connect_ex(sock, address):
        refuse(sock, address)
        return original_connect_ex(sock, address)

    socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
    try:
        yield
    finally:
        socket.socket.connect, socket.socket.connect_ex = original_connect, original_connect_ex
