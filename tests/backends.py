"""Small real backends on loopback, each in its own threads, each closed by its context manager."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Callable, Iterator

Handler = Callable[[socket.socket], None]


class TcpBackend:
    """Accepts connections on 127.0.0.1 and runs `handler` for each in a thread."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(128)
        self.port: int = self.sock.getsockname()[1]
        self.accepted = 0
        self._handler = handler
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        with contextlib.suppress(OSError):
            self._handler(conn)
        with contextlib.suppress(OSError):
            conn.close()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.close()
        self._acceptor.join(timeout=5)


@contextlib.contextmanager
def tcp_backend(handler: Handler) -> Iterator[TcpBackend]:
    backend = TcpBackend(handler)
    try:
        yield backend
    finally:
        backend.close()


def echo(conn: socket.socket) -> None:
    """Echo until EOF, then shut down our side: a faithful half-close peer."""
    while data := conn.recv(262144):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


def named_http(name: str) -> Handler:
    """A minimal HTTP/1.0 server that answers every request with its own name."""

    def handle(conn: socket.socket) -> None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = conn.recv(4096)
            if not chunk:
                return
            buf += chunk
        body = name.encode()
        conn.sendall(
            b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (len(body), body)
        )

    return handle


def greet_and_close(conn: socket.socket) -> None:
    """Speak first and hang up at once (SMTP banners, MySQL greetings): data before any request."""
    conn.sendall(b"hello from the backend\n")


def reply_after_eof(size: int) -> Handler:
    """Read until the client half-closes, then send `size` bytes and close."""

    def handle(conn: socket.socket) -> None:
        received = 0
        while data := conn.recv(65536):
            received += len(data)
        header = struct.pack("!Q", received)
        conn.sendall(header + b"r" * size)

    return handle


def reset_after_read(conn: socket.socket) -> None:
    """Read one chunk, then abort the connection with a RST."""
    conn.recv(1024)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


class UdpEcho:
    """Echoes every datagram back to its sender."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
                self.sock.sendto(data, addr)
            except TimeoutError:
                continue
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def free_port() -> int:
    """A port nothing listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
