from __future__ import annotations

import pytest
from dnslib import QTYPE, DNSRecord

from uproxy.demo.roles import dns_answer, parse_a_records


def query(name: str = "demo.uproxy.test", qtype: str = "A") -> DNSRecord:
    return DNSRecord.question(name, qtype)


def test_an_a_question_gets_the_answer() -> None:
    q = query()
    reply = dns_answer(q.pack(), "192.0.2.53")
    assert reply is not None
    assert parse_a_records(reply, q.header.id) == ["192.0.2.53"]
    record = DNSRecord.parse(reply)
    assert record.header.aa and record.header.rd and not record.header.ra
    assert [str(question.qname) for question in record.questions] == ["demo.uproxy.test."]


def test_other_questions_get_no_records() -> None:
    q = query(qtype="AAAA")
    reply = dns_answer(q.pack(), "192.0.2.53")
    assert reply is not None
    record = DNSRecord.parse(reply)
    assert record.header.rcode == 0 and record.rr == []
    assert record.q.qtype == QTYPE.AAAA


def test_replies_and_garbage_get_nothing() -> None:
    q = query()
    reply = dns_answer(q.pack(), "192.0.2.53")
    assert reply is not None
    assert dns_answer(reply, "192.0.2.53") is None
    assert dns_answer(b"\x00\x01", "192.0.2.53") is None


def test_a_reply_to_another_query_is_refused() -> None:
    q = query()
    reply = dns_answer(q.pack(), "192.0.2.53")
    assert reply is not None
    with pytest.raises(ValueError, match="not the reply"):
        parse_a_records(reply, (q.header.id + 1) % 65536)
    with pytest.raises(ValueError, match="malformed"):
        parse_a_records(b"\x00\x01\x02", q.header.id)
