"""The outcome policy: one test per row of the table in DESIGN.md, plus KRE's last-node rule."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from google.protobuf import any_pb2, wrappers_pb2

from protos.kre_nats_msg_pb2 import KreNatsMessage
from sidecar.outcome import (
    HEADER_ROOM,
    MAX_NAK_DELAY,
    Ack,
    BadInput,
    DeadLetterAndTerm,
    DeadLetterFailed,
    Exhausted,
    Facts,
    Nak,
    Policy,
    PublishErrorThenAck,
    PublishFailed,
    PublishThenAck,
    Raised,
    Returned,
    Unavailable,
    UpstreamError,
    decide,
    exhausted,
)
from sidecar.settings import SidecarSettings

NOW = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
POLICY = Policy(
    node_name="node-b",
    output_subject="out",
    error_subject="err",
    dlq_subject="out.dlq",
    max_deliver=5,
    nak_delay=1.0,
)
LAST = Policy(
    node_name="node-z",
    output_subject="entry",
    error_subject="entry",
    dlq_subject="entry.dlq",
    is_last_node=True,
    max_deliver=5,
    nak_delay=1.0,
)


def packed(text: str) -> any_pb2.Any:
    payload = any_pb2.Any()
    payload.Pack(wrappers_pb2.StringValue(value=text))
    return payload


def request(replied: bool = False) -> KreNatsMessage:
    msg = KreNatsMessage(tracking_id="t-1", reply="_INBOX.r", replied=replied)
    msg.tracking.add(node_name="node-a", start="s", end="e")
    return msg


def facts(attempt: int = 1, replied: bool = False, early: bool = False) -> Facts:
    return Facts(request(replied), attempt, early_replied=early)


def returned(text: str | None = "out") -> Returned:
    return Returned(packed(text) if text is not None else None, NOW, NOW)


def test_returned_message_is_published_then_acked() -> None:
    action = decide(returned(), facts(), POLICY)
    assert isinstance(action, PublishThenAck)
    assert action.subject == "out"
    assert action.envelope.tracking_id == "t-1"
    assert [t.node_name for t in action.envelope.tracking] == ["node-a", "node-b"]
    assert action.outcome == "published"


def test_returned_none_is_acked_with_nothing_published() -> None:
    action = decide(returned(None), facts(), POLICY)
    assert isinstance(action, Ack)
    assert action.outcome == "acked"


def test_early_reply_marks_the_output_replied() -> None:
    action = decide(returned(), facts(early=True), POLICY)
    assert isinstance(action, PublishThenAck)
    assert action.envelope.replied is True


def test_early_exit_publishes_the_output_to_the_entrypoint() -> None:
    policy = Policy("node-b", "out", "entry", entrypoint_subject="entry")
    happened = Returned(packed("done"), NOW, NOW, early_exit=True)
    action = decide(happened, facts(), policy)
    assert isinstance(action, PublishThenAck)
    assert action.subject == "entry"
    # As kre-py builds it: a plain output, tracking extended, the flag not passed on.
    assert action.envelope.early_exit is False
    assert [t.node_name for t in action.envelope.tracking] == ["node-a", "node-b"]


def test_an_input_marked_early_exit_also_ends_at_the_entrypoint() -> None:
    # kre-py reads the flag from the request it parsed, so a marked input does the same.
    policy = Policy("node-b", "out", "entry", entrypoint_subject="entry")
    marked = Facts(KreNatsMessage(tracking_id="t", early_exit=True), 1)
    action = decide(returned(), marked, policy)
    assert isinstance(action, PublishThenAck) and action.subject == "entry"


def test_early_exit_without_an_entrypoint_subject_is_an_error_envelope() -> None:
    happened = Returned(packed("done"), NOW, NOW, early_exit=True)
    action = decide(happened, facts(), POLICY)
    assert isinstance(action, PublishErrorThenAck)
    assert "KRT_NATS_ENTRYPOINT_SUBJECT" in action.envelope.error


def test_early_exit_at_the_last_node_of_a_replied_message_publishes_nothing() -> None:
    happened = Returned(packed("done"), NOW, NOW, early_exit=True)
    action = decide(happened, facts(replied=True), LAST)
    assert isinstance(action, Ack) and action.outcome == "skipped_replied"


def test_decide_encodes_nothing_even_for_a_large_output(monkeypatch) -> None:
    # Encoding and gzip happen after decide, off the event loop when big.
    from sidecar import envelope

    def refuse(*args: object) -> bytes:
        raise AssertionError("decide encoded an envelope")

    monkeypatch.setattr(envelope, "encode", refuse)
    action = decide(returned("x" * 2_000_000), facts(), POLICY)
    assert isinstance(action, PublishThenAck)
    assert action.envelope.payload.ByteSize() > 2_000_000


def test_an_output_too_large_once_encoded_is_decided_again_as_an_error() -> None:
    # What the message path asks when encoding refuses the output (PayloadTooLargeError).
    action = decide(Raised("output envelope is 9 bytes, 8 after gzip, over the 4"), facts(), POLICY)
    assert isinstance(action, PublishErrorThenAck)
    assert (
        action.envelope.error
        == "error in 'node-b': output envelope is 9 bytes, 8 after gzip, over the 4"
    )


def test_handler_raised_publishes_an_error_envelope_then_acks() -> None:
    action = decide(Raised("boom", "ValueError"), facts(), POLICY)
    assert isinstance(action, PublishErrorThenAck)
    assert action.subject == "err"
    assert action.envelope.error == "error in 'node-b': boom"
    assert action.envelope.tracking_id == "t-1"


def test_very_long_error_messages_are_cut() -> None:
    action = decide(Raised("x" * 100_000), facts(), POLICY)
    assert isinstance(action, PublishErrorThenAck)
    assert len(action.envelope.error) < 20_000
    assert action.envelope.error.endswith("... (cut)")


@pytest.mark.parametrize(
    ("attempt", "delay"), [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0)], ids=lambda v: str(v)
)
def test_retryable_error_naks_with_exponential_backoff(attempt: int, delay: float) -> None:
    action = decide(Raised("busy", "RetryableError", retryable=True), facts(attempt), POLICY)
    assert isinstance(action, Nak)
    assert action.delay == delay
    assert "busy" in action.reason


def test_backoff_is_capped() -> None:
    policy = Policy("n", "out", "err", max_deliver=100, nak_delay=5.0)
    action = decide(Unavailable("down"), facts(attempt=50), policy)
    assert isinstance(action, Nak)
    assert action.delay == MAX_NAK_DELAY


@pytest.mark.parametrize("attempt", [5, 6])
def test_retryable_error_at_max_deliver_is_dead_lettered(attempt: int) -> None:
    action = decide(Raised("busy", retryable=True), facts(attempt), POLICY)
    assert isinstance(action, DeadLetterAndTerm)
    assert action.subject == "err"
    assert action.envelope is not None
    assert action.envelope.tracking_id == "t-1"
    assert action.envelope.error.startswith("error in 'node-b': gave up after")
    assert "busy" in action.envelope.error


def test_handler_host_unavailable_naks() -> None:
    action = decide(Unavailable("UNAVAILABLE: socket closed"), facts(attempt=2), POLICY)
    assert isinstance(action, Nak)
    assert action.delay == 2.0
    assert "socket closed" in action.reason


def test_handler_host_unavailable_at_max_deliver_is_dead_lettered_not_lost() -> None:
    action = decide(Unavailable("down"), facts(attempt=5), POLICY)
    assert isinstance(action, DeadLetterAndTerm)
    assert action.envelope is not None and "handler host unavailable" in action.envelope.error


def test_publish_failed_naks() -> None:
    action = decide(PublishFailed("timeout"), facts(attempt=1), POLICY)
    assert isinstance(action, Nak)
    assert action.delay == 1.0


def test_publish_failed_at_max_deliver_is_dead_lettered() -> None:
    action = decide(PublishFailed("timeout"), facts(attempt=5), POLICY)
    assert isinstance(action, DeadLetterAndTerm)


def test_bad_input_is_dead_lettered_with_an_empty_tracking_id() -> None:
    action = decide(BadInput("bad gzip data"), Facts(None, 1), POLICY)
    assert isinstance(action, DeadLetterAndTerm)
    assert action.envelope is not None
    assert action.envelope.tracking_id == ""
    assert action.envelope.error == "error in 'node-b': bad input: bad gzip data"
    assert action.outcome == "dead_lettered"


def test_bad_input_is_never_retried_even_on_the_first_attempt() -> None:
    assert isinstance(decide(BadInput("empty"), Facts(None, 1), POLICY), DeadLetterAndTerm)


@pytest.mark.parametrize(("replied", "early"), [(True, False), (False, True), (True, True)])
def test_last_node_publishes_nothing_for_an_already_replied_message(
    replied: bool, early: bool
) -> None:
    action = decide(returned(), facts(replied=replied, early=early), LAST)
    assert isinstance(action, Ack)
    assert action.outcome == "skipped_replied"


def test_last_node_publishes_an_error_nothing_for_an_already_replied_message() -> None:
    action = decide(Raised("boom"), facts(replied=True), LAST)
    assert isinstance(action, Ack)
    assert action.outcome == "skipped_replied"


def test_last_node_dead_letter_of_a_replied_message_only_terms() -> None:
    action = decide(Unavailable("down"), facts(attempt=5, replied=True), LAST)
    assert isinstance(action, DeadLetterAndTerm)
    assert action.envelope is None


def test_last_node_publishes_when_not_replied() -> None:
    action = decide(returned(), facts(), LAST)
    assert isinstance(action, PublishThenAck)
    assert action.subject == "entry"


def test_replied_input_on_a_middle_node_is_still_published() -> None:
    action = decide(returned(), facts(replied=True), POLICY)
    assert isinstance(action, PublishThenAck)
    assert action.envelope.replied is True


def test_policy_from_settings_sends_errors_to_the_entrypoint() -> None:
    # KRE's runners since 2022-08: an error stops the workflow at the entrypoint.
    settings = SidecarSettings(
        node_name="n",
        nats_servers=("s",),
        nats_inputs=("i",),
        nats_stream="S",
        nats_output="out",
        dlq_subject="out.dlq",
        entrypoint_subject="entry",
        is_last_node=True,
        max_deliver=3,
        nak_delay=0.5,
        max_payload_bytes=2048,
    )
    policy = Policy.from_settings(settings)
    expected = Policy(
        "n", "out", "entry", True, 3, 0.5, 2048, "out.dlq", entrypoint_subject="entry"
    )
    assert policy == expected


def test_policy_without_an_entrypoint_sends_errors_where_the_output_goes() -> None:
    settings = SidecarSettings(
        node_name="n", nats_servers=("s",), nats_inputs=("i",), nats_stream="S", nats_output="out"
    )
    policy = Policy.from_settings(settings)
    assert (policy.error_subject, policy.entrypoint_subject) == ("out", "")


def test_policy_from_settings_keeps_room_under_the_server_max_payload() -> None:
    settings = SidecarSettings(
        node_name="n",
        nats_servers=("s",),
        nats_inputs=("i",),
        nats_stream="S",
        nats_output="out",
        dlq_subject="dead",
        max_payload_bytes=1024 * 1024,
    )
    assert Policy.from_settings(settings).publish_limit is None
    policy = Policy.from_settings(settings, server_max_payload=1024 * 1024)
    assert policy.publish_limit == 1024 * 1024 - HEADER_ROOM
    assert policy.dlq_subject == "dead"
    assert Policy.from_settings(settings, 8 * 1024 * 1024).publish_limit == 1024 * 1024


def test_dead_letters_name_the_dead_letter_subject() -> None:
    action = decide(BadInput("empty"), Facts(None, 1), POLICY)
    assert isinstance(action, DeadLetterAndTerm)
    assert action.dlq_subject == "out.dlq"
    policy = Policy("n", "out", "err", dlq_subject="dlq.n")
    action = decide(Raised("busy", retryable=True), facts(attempt=5), policy)
    assert isinstance(action, DeadLetterAndTerm) and action.dlq_subject == "dlq.n"


def test_last_node_dead_letter_of_a_replied_message_still_goes_to_the_dlq() -> None:
    action = decide(BadInput("x"), facts(replied=True), LAST)
    assert isinstance(action, DeadLetterAndTerm)
    assert action.envelope is None and action.dlq_subject == "entry.dlq"


@pytest.mark.parametrize("attempt", [6, 9])
def test_delivered_past_max_deliver_is_only_dead_lettered(attempt: int) -> None:
    action = decide(Exhausted(), facts(attempt), POLICY)
    assert isinstance(action, DeadLetterAndTerm)
    assert action.envelope is not None
    assert action.envelope.error == (
        f"error in 'node-b': gave up after {attempt} deliveries (KRT_MAX_DELIVER=5)"
    )


@pytest.mark.parametrize("attempt", [1, 5, 12])
def test_a_dead_letter_that_was_not_published_is_nacked_never_termed(attempt: int) -> None:
    action = decide(DeadLetterFailed("no responders"), facts(attempt), POLICY)
    assert isinstance(action, Nak)
    assert action.delay == POLICY.backoff(attempt)
    assert "dead letter not published: no responders" in action.reason
    assert action.outcome == "dead_letter_retried"


def test_an_earlier_nodes_error_travels_on_as_it_is() -> None:
    upstream = KreNatsMessage(tracking_id="t-1", error="error in 'node-a': boom", reply="r")
    upstream.tracking.add(node_name="entrypoint", start="s", end="e")
    action = decide(UpstreamError(), Facts(upstream, 1), POLICY)
    assert isinstance(action, PublishErrorThenAck)
    assert action.subject == "err" and action.outcome == "error_forwarded"
    assert action.envelope == upstream  # untouched, no tracking added


def test_the_last_node_does_not_forward_an_error_for_a_replied_message() -> None:
    upstream = KreNatsMessage(tracking_id="t-1", error="error in 'node-a': boom", replied=True)
    action = decide(UpstreamError(), Facts(upstream, 1), LAST)
    assert isinstance(action, Ack) and action.outcome == "skipped_replied"


# A host failure: only the message that was alone in the host is charged.


def test_a_host_failure_beside_other_messages_is_not_counted_and_isolates() -> None:
    action = decide(Unavailable("socket closed", in_host=True), facts(attempt=5), POLICY)
    assert isinstance(action, Nak)
    assert (action.counted, action.alone_next, action.outcome) == (False, True, "suspect")
    assert action.delay == POLICY.nak_delay
    assert "not counted, tried again alone" in action.reason


def test_a_host_failure_while_alone_counts_and_the_last_one_dead_letters() -> None:
    alone = Facts(request(), attempt=2, excused=1, alone=True)
    action = decide(Unavailable("socket closed", in_host=True), alone, POLICY)
    assert isinstance(action, Nak) and action.counted and action.alone_next
    assert action.outcome == "culprit_retried"
    assert action.delay == POLICY.backoff(1)
    last = Facts(request(), attempt=6, excused=1, alone=True)
    letter = decide(Unavailable("socket closed", in_host=True), last, POLICY)
    assert isinstance(letter, DeadLetterAndTerm)
    assert "crashed or blocked the handler host while alone" in letter.reason
    assert "gave up after 5 attempts (KRT_MAX_DELIVER=5)" in letter.reason
    assert letter.envelope is not None and "crashed or blocked" in letter.envelope.error


def test_excused_deliveries_do_not_count_toward_max_deliver() -> None:
    excused = Facts(request(), attempt=5, excused=1)
    action = decide(Raised("busy", retryable=True), excused, POLICY)
    assert isinstance(action, Nak) and action.delay == POLICY.backoff(4)
    assert not exhausted(Facts(request(), attempt=6, excused=1), POLICY)
    assert exhausted(Facts(request(), attempt=6), POLICY)


def test_an_unreachable_host_still_counts_as_before() -> None:
    action = decide(Unavailable("down"), facts(attempt=2), POLICY)
    assert isinstance(action, Nak) and action.counted and not action.alone_next
