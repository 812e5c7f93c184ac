"""Mutated manifests hot-reloaded into a running proxy under load (issue 18).

While 20 concurrent clients keep calling the web service, a second manifest file beside the web
service's is rewritten with hypothesis-generated mutations of a valid Service and EndpointSlice:
nasty scalars (huge integers, impossible timestamps, bad tags, deep nesting, YAML bombs), random
bytes, truncations, deletions. Whatever the file holds, the running proxy never crashes, never
lets an exception escape its manifest source, and no request to the web service fails. Afterwards
the file is made valid again and its service is served: reloading still works.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.chaos.test_dead_endpoint import load
from tests.integration.test_kernel_modes import BACKEND_IPS, Topology, start_uproxy

pytestmark = pytest.mark.root

MUTANT_VIP = "10.96.0.77"
SEEN = ("manifest_invalid", "manifests_loaded", "manifest_ignored", "manifest_object_skipped")
EXAMPLES = 40
BASE = yaml.safe_dump_all(
    [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "mutant", "namespace": "chaos"},
            "spec": {
                "clusterIP": MUTANT_VIP,
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
                "sessionAffinity": "ClientIP",
            },
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "mutant-1",
                "namespace": "chaos",
                "labels": {"kubernetes.io/service-name": "mutant"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [BACKEND_IPS[0]], "conditions": {"ready": True}}],
        },
    ],
    sort_keys=False,
).encode()
SCALARS = [m.span() for m in re.finditer(rb"(?<=: )[^\s{}\[\]]+", BASE)]
NASTY = [
    b"9" * 5000,  # beyond Python's integer-string limit
    b"-" + b"9" * 30,
    b"2001-13-01",
    b"1999-12-31 25:00:00",
    b"!!bool maybe",
    b"!!float abc",
    b"!<tag:yaml.org,2002:int> 12a",
    b"!!binary ###",
    b"!!python/object:os.system x",
    b"[" * 2000 + b"]" * 2000,
    b"{a: " * 500 + b"1" + b"}" * 500,
    b"&a [*a]",
    b"*undefined",
    b"\x00\xff\xfe",
    b"\xef\xbb\xbf",
    b"null",
    b"~",
    b"65536",
    b"0x1F",
    b"1e400",
    b".nan",
    b'"\\uD800"',
    b"'unterminated",
]
BOMB = b"a: &a [x, x, x, x, x, x, x, x, x]\n" + b"".join(
    b"%c: &%c [*%c, *%c, *%c, *%c, *%c, *%c, *%c, *%c, *%c]\n"
    % (ord("b") + i, ord("b") + i, *([ord("a") + i] * 9))
    for i in range(8)
)

replace_scalar = st.tuples(
    st.just("scalar"), st.integers(0, len(SCALARS) - 1), st.sampled_from(NASTY)
)
insert_bytes = st.tuples(st.just("insert"), st.integers(0, len(BASE)), st.binary(max_size=24))
truncate = st.tuples(st.just("truncate"), st.integers(0, len(BASE)), st.just(b""))
delete = st.tuples(st.just("delete"), st.integers(0, len(BASE)), st.binary(min_size=1, max_size=40))
bomb = st.tuples(st.just("bomb"), st.just(0), st.just(b""))
MUTATIONS = st.lists(
    st.one_of(replace_scalar, insert_bytes, truncate, delete, bomb), min_size=1, max_size=4
)


def mutate(mutations: list[tuple[str, int, bytes]]) -> bytes:
    text = BASE
    # Scalars are replaced back to front so the recorded spans stay valid.
    scalar_edits = sorted((m for m in mutations if m[0] == "scalar"), key=lambda m: -m[1])
    for _, index, value in scalar_edits:
        start, end = SCALARS[index]
        text = text[:start] + value + text[end:]
    for kind, at, data in mutations:
        at = min(at, len(text))
        if kind == "insert":
            text = text[:at] + data + text[at:]
        elif kind == "truncate":
            text = text[:at]
        elif kind == "delete":
            text = text[:at] + text[at + len(data) :]
        elif kind == "bomb":
            text = BOMB + text
    return text


def test_mutated_manifests_never_crash_the_proxy_or_fail_a_request(
    topo: tuple[Topology, Path],
) -> None:
    topology, config = topo
    uproxy = start_uproxy(topology, config, "userspace", "nft")
    mutant = config / "mutant.yaml"
    stop = threading.Event()
    seen: Counter[str] = Counter()

    def keep_calling() -> None:
        while not stop.is_set():
            seen.update(load(topology, each=10))

    caller = threading.Thread(target=keep_calling, daemon=True)
    mark = len(uproxy.events)
    caller.start()
    written = 0

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,  # the same mutants in every run: CI failures reproduce
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(MUTATIONS)
    def reload_a_mutant(mutations: list[tuple[str, int, bytes]]) -> None:
        nonlocal written
        tmp = config / ".mutant.tmp"
        tmp.write_bytes(mutate(mutations))
        before = len(uproxy.events)
        tmp.replace(mutant)
        written += 1
        # The source looks every 0.25 s; a mutant that changes nothing it reads logs nothing.
        with contextlib.suppress(AssertionError):
            uproxy.wait_any(SEEN, timeout=1.5, after=before)
        assert uproxy.proc.poll() is None, uproxy.tail()

    try:
        reload_a_mutant()
    finally:
        stop.set()
        caller.join(timeout=120)

    assert written >= EXAMPLES
    events = uproxy.events[mark:]
    escaped = [e for e in events if e.get("event") == "manifest_source_error"]
    assert not escaped, escaped[:3]
    rejected = [e for e in events if e.get("event") == "manifest_invalid"]
    assert len(rejected) >= EXAMPLES // 4, f"only {len(rejected)} mutants were rejected"
    assert all("mutant.yaml" in str(e.get("path")) for e in rejected), rejected[:3]
    assert sum(seen.values()) > 0
    assert not [k for k in seen if k.startswith("failed")], seen
    print(f"mutants={written} rejected={len(rejected)} requests={sum(seen.values())}")

    # Made valid again, the mutant's service is served: the source still reloads.
    tmp = config / ".mutant.tmp"
    tmp.write_bytes(BASE)
    tmp.replace(mutant)
    deadline = time.monotonic() + 15
    answer = ""
    while time.monotonic() < deadline:
        answer = topology.client.run(
            "curl", "-sS", "--max-time", "2", f"http://{MUTANT_VIP}/", check=False
        ).stdout
        if answer.split()[:1] == ["be1"]:
            break
        time.sleep(0.25)
    assert answer.split()[:1] == ["be1"], uproxy.tail()
    assert uproxy.stop() == 0, uproxy.tail()
