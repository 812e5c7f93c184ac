"""The reuseport steering program: its bytes, and what it computes (a small cBPF interpreter)."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from uproxy.workers.reuseport_bpf import SKF_NET_OFF, program_bytes, steering_program


def run(program: bytes, network_header: bytes) -> int:
    """Classic BPF, only the instructions the program uses; loads read the network header."""
    insns = [struct.unpack_from("=HBBI", program, i) for i in range(0, len(program), 8)]
    a, pc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        offset = (k - (SKF_NET_OFF & 0xFFFFFFFF)) & 0xFFFFFFFF
        pc += 1
        if code == 0x30:
            a = network_header[offset]
        elif code == 0x20:
            a = int.from_bytes(network_header[offset : offset + 4], "big")
        elif code == 0x74:
            a >>= k
        elif code == 0x24:
            a = (a * k) & 0xFFFFFFFF
        elif code == 0x94:
            a %= k
        elif code == 0x15:
            pc += jt if a == k else jf
        elif code == 0x05:
            pc += k
        elif code == 0x16:
            return a
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


def ipv4_header(source: str) -> bytes:
    return bytes([0x45, 0]) + bytes(10) + ipaddress.IPv4Address(source).packed + bytes(4)


def ipv6_header(source: str) -> bytes:
    return bytes([0x60]) + bytes(7) + ipaddress.IPv6Address(source).packed + bytes(16)


def test_the_bytes_are_ten_sock_filter_records_ending_in_ret_a() -> None:
    code = program_bytes(2)
    assert len(code) == 10 * 8
    assert code[:8] == struct.pack("=HBBI", 0x30, 0, 0, 0xFFF00000)  # ldb [SKF_NET_OFF]
    assert code[24:32] == struct.pack("=HBBI", 0x20, 0, 0, 0xFFF0000C)  # ld [SKF_NET_OFF+12]
    assert code[64:72] == struct.pack("=HBBI", 0x94, 0, 0, 2)  # mod #2
    assert code[72:] == struct.pack("=HBBI", 0x16, 0, 0, 0)  # ret a


def test_the_index_depends_on_the_source_address_only_and_stays_in_range() -> None:
    for workers in (1, 2, 3, 8):
        code = program_bytes(workers)
        for n in range(1, 200):
            index = run(code, ipv4_header(f"10.10.{n // 50}.{n}"))
            assert 0 <= index < workers
    code = program_bytes(4)
    spread = {run(code, ipv4_header(f"10.10.0.{n}")) for n in range(2, 40)}
    assert spread == {0, 1, 2, 3}  # neighbouring clients spread over every worker


def test_ipv6_uses_the_last_word_of_the_source() -> None:
    code = program_bytes(4)
    a = run(code, ipv6_header("fd00::1:2"))
    assert a == run(code, ipv6_header("fd00:ffff::1:2"))  # same interface identifier
    assert {run(code, ipv6_header(f"fd00::{n:x}")) for n in range(2, 40)} == {0, 1, 2, 3}


def test_zero_workers_is_refused() -> None:
    with pytest.raises(ValueError):
        steering_program(0)
