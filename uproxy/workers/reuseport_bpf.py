"""The classic BPF program that steers a reuseport group by client address.

The kernel spreads connections over SO_REUSEPORT sockets by a hash of the whole 4-tuple, so
one client's connections would land on different workers, each with its own affinity table.
This program picks the socket from the client's source address alone: every connection and
every datagram of one client reaches the same worker. It returns an index into the group,
which is the order in which the group's sockets were bound (UDP) or started listening (TCP);
the main process creates them in worker order and keeps them open, so index i stays worker i.
"""

from __future__ import annotations

import ctypes
import socket
import struct

SO_ATTACH_REUSEPORT_CBPF = 51
SO_DETACH_REUSEPORT_BPF = 68

# Loads at SKF_NET_OFF + k read the network header; the program runs with skb->data past the
# transport header, so plain offsets would read the payload.
SKF_NET_OFF = -0x100000

# Opcodes (linux/filter.h).
BPF_LD_B_ABS = 0x30
BPF_LD_W_ABS = 0x20
BPF_ALU_MUL_K = 0x24
BPF_ALU_RSH_K = 0x74
BPF_ALU_MOD_K = 0x94
BPF_JMP_JEQ_K = 0x15
BPF_JMP_JA = 0x05
BPF_RET_A = 0x16

# Knuth's multiplicative hash: neighbouring addresses (10.0.0.2, 10.0.0.3) spread as well as
# distant ones, whatever N is.
GOLDEN = 0x9E3779B1

_INSN = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k
_FPROG = struct.Struct("@HP")  # struct sock_fprog: len, then a pointer (padding is native)


def _net(offset: int) -> int:
    return (SKF_NET_OFF + offset) & 0xFFFFFFFF


def steering_program(workers: int) -> list[tuple[int, int, int, int]]:
    """The instructions, as (code, jt, jf, k): hash the source address, modulo `workers`.

    IPv4 hashes the whole source address; IPv6 its last 32 bits (the interface identifier, which
    tells hosts of one prefix apart). The version nibble picks the offset, so an IPv6 socket that
    also accepts IPv4 steers both."""
    if workers < 1:
        raise ValueError("workers must be at least 1")
    return [
        (BPF_LD_B_ABS, 0, 0, _net(0)),  # A = first byte of the IP header
        (BPF_ALU_RSH_K, 0, 0, 4),  # A = IP version
        (BPF_JMP_JEQ_K, 2, 0, 6),  # IPv6: skip to the IPv6 load
        (BPF_LD_W_ABS, 0, 0, _net(12)),  # IPv4 source address
        (BPF_JMP_JA, 0, 0, 1),
        (BPF_LD_W_ABS, 0, 0, _net(8 + 12)),  # IPv6 source address, last word
        (BPF_ALU_MUL_K, 0, 0, GOLDEN),
        (BPF_ALU_RSH_K, 0, 0, 16),
        (BPF_ALU_MOD_K, 0, 0, workers),
        (BPF_RET_A, 0, 0, 0),  # the socket's index in the group
    ]


def program_bytes(workers: int) -> bytes:
    return b"".join(_INSN.pack(*insn) for insn in steering_program(workers))


def attach(sock: socket.socket, workers: int) -> None:
    """Steer the group `sock` belongs to (the program is the group's, not the socket's)."""
    code = program_bytes(workers)
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = _FPROG.pack(len(code) // _INSN.size, ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def detach(sock: socket.socket) -> None:
    """Back to the kernel's 4-tuple hash, which spreads even one client over every worker."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)
    except FileNotFoundError:
        pass  # ENOENT: nothing attached
