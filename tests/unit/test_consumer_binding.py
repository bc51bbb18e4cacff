"""Binding the durable consumer: a conflicting consumer and uncaptured subjects, in words."""

from __future__ import annotations

import logging
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import nats.js.errors
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, ReplayPolicy, RetentionPolicy

from sidecar import consumer as consumer_module
from sidecar.binding import consumer_config, consumer_differences, subject_matches
from sidecar.consumer import Consumer
from sidecar.errors import ConsumerConflict, ConsumerTakenByAnotherInput, SubjectNotCaptured
from tests.unit.fake_jetstream import (
    FakeJs,
    ReadyChannel,
    ServingSub,
    consumer_settings,
)
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(20)

SETTINGS = consumer_settings(
    nats_stream="S", nats_inputs=("S.in",), nats_output="S.out", durable="v1-n", dlq_subject="S.dlq"
)
WANTED = consumer_config(SETTINGS)
# The consumer KRE's Python runner (kre-py) makes, as the server describes it.
KRE_PY = ConsumerConfig(
    durable_name="v1-n",
    deliver_subject="_INBOX.abc",
    deliver_group="v1-n",
    deliver_policy=DeliverPolicy.NEW,
    ack_policy=AckPolicy.EXPLICIT,
    ack_wait=79200.0,
    max_deliver=-1,
    replay_policy=ReplayPolicy.INSTANT,
    filter_subject="S.in",
)


def test_a_kre_py_consumer_differs_by_push_deliver_policy_and_ack_wait() -> None:
    assert consumer_differences(KRE_PY, WANTED) == [
        "it is a push consumer (deliver subject _INBOX.abc and deliver group v1-n); "
        "the sidecar needs a pull consumer",
        "deliver policy is new, not all",
        "ack wait is 79200s, not 30s",
    ]


def test_the_consumer_the_sidecar_makes_differs_in_nothing() -> None:
    assert consumer_differences(replace(WANTED, replay_policy=ReplayPolicy.INSTANT), WANTED) == []


def test_policies_limits_and_filters_are_named() -> None:
    have = replace(
        WANTED,
        ack_policy=AckPolicy.NONE,
        replay_policy=ReplayPolicy.ORIGINAL,
        max_deliver=5,
        filter_subject=None,
    )

    assert consumer_differences(have, WANTED) == [
        "ack policy is none, not explicit",
        "replay policy is original, not instant",
        "max deliver is 5, not unlimited",
        "filter subjects are none (every subject of the stream), not S.in",
    ]


def test_several_filters_compare_in_any_order() -> None:
    want = replace(WANTED, filter_subject=None, filter_subjects=["S.a", "S.b"])

    assert consumer_differences(replace(want, filter_subjects=["S.b", "S.a"]), want) == []
    assert consumer_differences(replace(want, filter_subjects=["S.a"]), want) == [
        "filter subjects are S.a, not S.a, S.b"
    ]


def test_the_errors_say_what_differs_and_what_to_do() -> None:
    conflict = ConsumerConflict("S", "v1-n", ["deliver policy is new, not all"], "refused")
    bare = ConsumerConflict("S", "v1-n", [], "refused")
    missing = SubjectNotCaptured("KRT_NATS_DLQ_SUBJECT", "S.dlq", "S", ["S.in"], "it breaks")

    assert str(conflict) == (
        "consumer v1-n on stream S exists with settings the server will not change "
        "(refused): deliver policy is new, not all. Delete it once no old replica uses it "
        "(nats consumer rm S v1-n), or set KRT_NATS_DURABLE to a new name"
    )
    assert "(refused): no difference the sidecar knows of." in str(bare)
    assert str(missing) == (
        "KRT_NATS_DLQ_SUBJECT=S.dlq is captured by no stream: it breaks. Add it to the "
        "subjects of stream S (now: S.in), or set KRT_NATS_DLQ_SUBJECT to a subject that a "
        "stream captures"
    )
    assert missing.variable == "KRT_NATS_DLQ_SUBJECT" and conflict.differences == (
        "deliver policy is new, not all",
    )


class BindingJs(FakeJs):
    """Streams with subjects and retention, consumers, and one durable that may conflict."""

    def __init__(self, streams: dict[str, list[str]], retention: str = "limits") -> None:
        super().__init__(ServingSub([]))
        self.streams = streams
        self.retention = retention
        self.others: list[ConsumerConfig] = []  # the streams' other consumers
        self.existing: ConsumerConfig | None = None  # our durable, made by someone else
        self.refusal = nats.js.errors.ServerError(
            code=500, err_code=10012, description="deliver policy can not be updated"
        )

    async def add_consumer(self, stream: str, config: Any) -> None:
        if self.existing is not None:
            raise self.refusal

    async def consumer_info(self, stream: str, durable: str) -> Any:
        if self.existing is None:
            raise nats.js.errors.NotFoundError
        return SimpleNamespace(name=durable, config=self.existing)

    async def stream_info(self, stream: str) -> Any:
        config = SimpleNamespace(subjects=self.streams[stream], retention=self.retention)
        return SimpleNamespace(config=config)

    async def find_stream_name_by_subject(self, subject: str) -> str:
        for name, subjects in self.streams.items():
            if any(subject_matches(pattern, subject) for pattern in subjects):
                return name
        raise nats.js.errors.NotFoundError

    async def consumers_info(self, stream: str) -> list[Any]:
        return [SimpleNamespace(config=c) for c in self.others]


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(consumer_module, "BIND_RETRY", 0.01)


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_conflict_is_logged_once_and_cleared_when_the_consumer_goes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.consumer")
    js = BindingJs({"S": ["S.in", "S.out", "S.dlq"]})
    js.existing = KRE_PY
    calls = 0
    add = js.add_consumer

    async def counted(stream: str, config: Any) -> None:
        nonlocal calls
        calls += 1
        await add(stream, config)

    js.add_consumer = counted  # type: ignore[method-assign]
    consumer = Consumer(SETTINGS, js, ReadyChannel())  # type: ignore[arg-type]
    consumer.start()
    try:
        await eventually(lambda: calls >= 5)
        assert not consumer.bound and js.binds == 0
        assert consumer.status.startswith("consumer v1-n on stream S exists")
        assert "(deliver policy can not be updated)" in consumer.status
        [line] = errors(caplog)
        assert line.startswith(consumer.status) and line.endswith("; retrying every 0.01s")

        js.existing = None  # `nats consumer rm S v1-n`
        await eventually(lambda: consumer.bound)
        assert js.binds == 1 and len(errors(caplog)) == 1
        assert "recovered: consumer v1-n on stream S is bound" in caplog.text
    finally:
        await consumer.stop(0)


async def test_a_refusal_for_a_consumer_that_does_not_exist_is_no_conflict() -> None:
    js = BindingJs({"S": ["S.in", "S.out", "S.dlq"]})
    js.existing = KRE_PY
    js.refusal = nats.js.errors.BadRequestError(
        code=400, err_code=10093, description="filter subject is not a subset"
    )

    async def gone(stream: str, durable: str) -> Any:
        raise nats.js.errors.NotFoundError

    js.consumer_info = gone  # type: ignore[method-assign]
    consumer = Consumer(SETTINGS, js, ReadyChannel())  # type: ignore[arg-type]
    consumer.start()
    try:
        await eventually(lambda: "filter subject is not a subset" in consumer.status)
        assert consumer.status.startswith("cannot bind consumer v1-n on stream S: ")
    finally:
        await consumer.stop(0)


async def test_another_refusal_of_a_matching_consumer_is_no_conflict() -> None:
    js = BindingJs({"S": ["S.in", "S.out", "S.dlq"]})
    js.existing = WANTED
    js.refusal = nats.js.errors.ServerError(code=500, err_code=10077, description="busy")
    consumer = Consumer(SETTINGS, js, ReadyChannel())  # type: ignore[arg-type]
    consumer.start()
    try:
        await eventually(lambda: "busy" in consumer.status)
        assert consumer.status.startswith("cannot bind consumer v1-n")
    finally:
        await consumer.stop(0)


@pytest.mark.parametrize(
    ("missing", "variable"),
    [("S.dlq", "KRT_NATS_DLQ_SUBJECT"), ("S.entry", "KRT_NATS_ENTRYPOINT_SUBJECT")],
)
async def test_an_uncaptured_subject_stops_fetching_until_a_stream_captures_it(
    missing: str, variable: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.consumer")
    settings = replace(SETTINGS, entrypoint_subject="S.entry")
    subjects = [s for s in ("S.in", "S.out", "S.dlq", "S.entry") if s != missing]
    js = BindingJs({"S": subjects, "OTHER": ["X.>"]})
    consumer = Consumer(settings, js, ReadyChannel())  # type: ignore[arg-type]
    consumer.start()
    try:
        await eventually(lambda: variable in consumer.status)
        assert consumer.status.startswith(f"{variable}={missing} is captured by no stream")
        assert js.binds == 0 and js.sub.batches == []  # nothing fetched

        js.streams["OTHER"].append(missing)  # another stream captures it: enough
        await eventually(lambda: consumer.bound)
        assert len(errors(caplog)) == 1 and "recovered" in caplog.text
    finally:
        await consumer.stop(0)


async def test_an_uncaptured_output_is_only_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    js = BindingJs({"S": ["S.in", "S.dlq"]})
    consumer = Consumer(SETTINGS, js, ReadyChannel())  # type: ignore[arg-type]
    consumer.start()
    try:
        await eventually(lambda: consumer.bound)
        assert "KRT_NATS_OUTPUT=S.out is captured by no stream" in caplog.text
    finally:
        await consumer.stop(0)


@pytest.mark.parametrize(
    ("others", "warned"),
    [
        ([], True),
        ([ConsumerConfig(durable_name="in", filter_subject="S.in")], True),
        ([ConsumerConfig(durable_name="dl", filter_subject="S.dlq")], False),
        ([ConsumerConfig(durable_name="all", filter_subjects=["S.x", "S.>"])], False),
        ([ConsumerConfig(durable_name="everything")], False),  # no filter: every subject
    ],
)
async def test_dead_letters_dropped_by_an_interest_stream_are_warned_about_once(
    others: list[ConsumerConfig], warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    js = BindingJs({"S": ["S.in", "S.out", "S.dlq"]}, retention=RetentionPolicy.INTEREST)
    js.others = others
    consumer = Consumer(SETTINGS, js, ReadyChannel())  # type: ignore[arg-type]
    for _ in range(2):  # bound twice, as after a consumer deleted under the loop
        await consumer._bind()
    await consumer.stop(0)

    lines = [r for r in caplog.records if "drops every dead letter" in r.getMessage()]
    assert len(lines) == (1 if warned else 0)
    if warned:
        assert lines[0].levelno == logging.WARNING
        assert (
            lines[0]
            .getMessage()
            .startswith(
                "KRT_NATS_DLQ_SUBJECT=S.dlq is captured by stream S, whose retention is interest"
            )
        )


async def test_a_durable_that_reads_another_input_is_refused_and_never_repointed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.consumer")
    js = BindingJs({"S": ["S.in", "S.other", "S.out", "S.dlq"]})
    js.existing = replace(WANTED, filter_subject="S.other")  # another node's, same durable
    changed: list[ConsumerConfig] = []

    async def add(stream: str, config: Any) -> None:
        changed.append(config)

    looked: list[str] = []
    info = js.consumer_info

    async def counted(stream: str, durable: str) -> Any:
        looked.append(durable)
        return await info(stream, durable)

    js.add_consumer = add  # type: ignore[method-assign]
    js.consumer_info = counted  # type: ignore[method-assign]
    consumer = Consumer(SETTINGS, js, ReadyChannel())  # type: ignore[arg-type]
    consumer.start()
    try:
        await eventually(lambda: len(looked) >= 5)  # several retries, each refused
        assert changed == [] and js.binds == 0 and not consumer.bound
        assert consumer.status.startswith(
            "consumer v1-n on stream S takes S.other, not this node's input S.in "
            "(KRT_NATS_INPUT): another node probably has KRT_NATS_DURABLE=v1-n too"
        )
        assert "nats consumer rm S v1-n" in consumer.status
        [line] = errors(caplog)  # once, not at every retry
        assert line.startswith(consumer.status)

        js.existing = None  # the other node got its own durable; this one is deleted
        await eventually(lambda: consumer.bound)
        assert [c.filter_subject for c in changed] == ["S.in"]
    finally:
        await consumer.stop(0)


def test_the_durable_conflict_is_a_consumer_conflict_with_the_filters() -> None:
    conflict = ConsumerTakenByAnotherInput("S", "d", [], ["S.a", "S.b"])

    assert isinstance(conflict, ConsumerConflict)
    assert conflict.differences == (
        "filter subjects are none (every subject of the stream), not S.a, S.b",
    )
    assert str(conflict).startswith(
        "consumer d on stream S takes none (every subject of the stream), not this node's "
        "input S.a, S.b"
    )


@pytest.mark.parametrize(
    ("streams", "where"),
    [
        ({"S": ["S.out", "S.dlq"]}, "is captured by no stream"),
        (
            {"S": ["S.out", "S.dlq"], "OTHER": ["S.in"]},
            "is captured by stream OTHER, not by KRT_NATS_STREAM=S",
        ),
    ],
)
async def test_an_input_the_nodes_stream_does_not_capture_keeps_it_unready(
    streams: dict[str, list[str]], where: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.consumer")
    js = BindingJs(streams)
    consumer = Consumer(SETTINGS, js, ReadyChannel())  # type: ignore[arg-type]
    consumer.start()
    try:
        await eventually(lambda: "KRT_NATS_INPUT" in consumer.status)
        assert consumer.status == (
            f"KRT_NATS_INPUT=S.in {where}: the consumer would never receive a message. Add "
            "it to the subjects of stream S (now: S.out, S.dlq), or set KRT_NATS_STREAM to "
            "the stream that captures the input"
        )
        assert js.binds == 0 and not consumer.bound
        [line] = errors(caplog)
        assert line.startswith(consumer.status)

        js.streams["S"].append("S.*")  # the operator's fix, picked up without a restart
        await eventually(lambda: consumer.bound)
        assert "recovered" in caplog.text
    finally:
        await consumer.stop(0)


async def test_every_input_is_checked() -> None:
    settings = replace(SETTINGS, nats_inputs=("S.in", "T.in"))
    js = BindingJs({"S": ["S.in", "S.out", "S.dlq"]})
    consumer = Consumer(settings, js, ReadyChannel())  # type: ignore[arg-type]
    consumer.start()
    try:
        await eventually(lambda: consumer.status.startswith("KRT_NATS_INPUT=T.in is captured"))
        assert not consumer.bound
    finally:
        await consumer.stop(0)
