"""ctx.db, ctx.prediction and ctx.measurement: every invalid argument, the exact lines
sent to InfluxDB, the settings. No network: the stores get a fake client."""

from __future__ import annotations

import asyncio
import math
import re
import time
from datetime import UTC, datetime, timedelta, timezone
from fractions import Fraction
from typing import Any

import pytest
from bson.errors import InvalidDocument
from pymongo.errors import OperationFailure, ServerSelectionTimeoutError

from handler_host.errors import RetryableError, SettingsError
from handler_host.fakes import LineSink
from handler_host.services import (
    Measurements,
    ServiceArgumentError,
    Services,
    ServiceSettings,
    StoreError,
    StoreUnavailableError,
    line_protocol,
    mask_uri,
)
from handler_host.services.mongo import MongoStore, PredictionStore, prediction_document

# A moment with microseconds, and its count in each precision since the epoch.
MOMENT = datetime(2024, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
SECONDS = 1704164645


class FakeCollection:
    """Records calls; ``fail`` makes every call raise it, ``hang`` never answer."""

    def __init__(self, log: list[tuple[str, Any]], fail: BaseException | None, hang: bool) -> None:
        self._log = log
        self._fail = fail
        self._hang = hang

    async def _answer(self) -> None:
        if self._hang:
            await asyncio.sleep(3600)
        if self._fail is not None:
            raise self._fail

    async def insert_one(self, doc: dict[str, Any]) -> None:
        self._log.append(("insert_one", dict(doc)))
        await self._answer()
        doc["_id"] = "new-id"  # as PyMongo does, on the dict it was given

    def find(self, query: dict[str, Any]) -> FakeCollection:
        self._log.append(("find", query))
        return self

    async def to_list(self) -> list[dict[str, Any]]:
        await self._answer()
        return [{"_id": 1, "a": 1}]


class FakeTopology:
    def server_descriptions(self) -> dict[tuple[str, int], None]:
        return {("db.example", 27017): None}


class FakeClient:
    """Stands for AsyncMongoClient: client[db][coll] and the seed list."""

    topology_description = FakeTopology()

    def __init__(self, fail: BaseException | None = None, hang: bool = False) -> None:
        self.calls: list[tuple[str, Any]] = []
        self._fail = fail
        self._hang = hang

    def __getitem__(self, name: str) -> Any:
        client = self

        class _Db:
            def __getitem__(self, coll: str) -> FakeCollection:
                return FakeCollection(client.calls, client._fail, client._hang)

        return _Db()


def db(client: FakeClient | None = None, timeout_s: float = 5.0) -> MongoStore:
    return MongoStore(client or FakeClient(), "data", timeout_s)  # type: ignore[arg-type]


def prediction(client: FakeClient | None = None) -> PredictionStore:
    return PredictionStore(client or FakeClient(), "data", 5.0, "vid-1", "v1")  # type: ignore[arg-type]


def measurements() -> tuple[Measurements, LineSink]:
    sink = LineSink()
    return Measurements(sink, version="v1", workflow="wf", node="n2"), sink


# --- ctx.db -----------------------------------------------------------------------------

BAD_COLLECTIONS = ["", None, 5, b"coll", "a$b", "system.users", ".a", "a.", "a..b", "a\x00b"]


@pytest.mark.parametrize("coll", BAD_COLLECTIONS)
async def test_db_save_and_find_refuse_a_bad_collection(coll: object) -> None:
    client = FakeClient()
    with pytest.raises(ServiceArgumentError, match=r"^\[ctx\.db\.save\] invalid 'collection'="):
        await db(client).save(coll, {"a": 1})  # type: ignore[arg-type]
    with pytest.raises(ServiceArgumentError, match=r"^\[ctx\.db\.find\] invalid 'collection'="):
        await db(client).find(coll, {"a": 1})  # type: ignore[arg-type]
    assert client.calls == []


async def test_db_messages_are_kre_s() -> None:
    with pytest.raises(ServiceArgumentError) as caught:
        await db().save("", {"a": 1})
    assert str(caught.value) == "[ctx.db.save] invalid 'collection'='', must be a nonempty string"
    assert isinstance(caught.value, ValueError)
    assert (caught.value.method, caught.value.argument) == ("ctx.db.save", "collection")
    with pytest.raises(ServiceArgumentError) as caught:
        await db().find("c", {})
    assert str(caught.value) == "[ctx.db.find] invalid 'query'={}, must be a nonempty dict"


@pytest.mark.parametrize("data", [None, [("a", 1)], "a=1", 5])
async def test_db_save_refuses_data_that_is_not_a_dict(data: object) -> None:
    client = FakeClient()
    with pytest.raises(ServiceArgumentError, match=r"\[ctx\.db\.save\] invalid 'data'="):
        await db(client).save("c", data)  # type: ignore[arg-type]
    assert client.calls == []


@pytest.mark.parametrize("query", [None, {}, [("a", 1)], "a=1"])
async def test_db_find_refuses_a_query_that_is_not_a_nonempty_dict(query: object) -> None:
    client = FakeClient()
    with pytest.raises(ServiceArgumentError, match=r"must be a nonempty dict"):
        await db(client).find("c", query)  # type: ignore[arg-type]
    assert client.calls == []


async def test_db_save_leaves_the_callers_dict_alone() -> None:
    client = FakeClient()
    data = {"a": 1}
    await db(client).save("c", data)
    assert data == {"a": 1}
    assert client.calls == [("insert_one", {"a": 1})]


async def test_a_long_value_is_cut_in_the_message() -> None:
    with pytest.raises(ServiceArgumentError) as caught:
        await db().save("c", "x" * 1_000_000)  # type: ignore[arg-type]
    assert len(str(caught.value)) < 200


async def test_data_bson_cannot_encode_is_an_argument_error() -> None:
    client = FakeClient(fail=InvalidDocument("cannot encode object: {1}, of type: <class 'set'>"))
    with pytest.raises(ServiceArgumentError, match=r"'data'=.*must be encodable as BSON"):
        await db(client).save("c", {"s": {1}})


async def test_driver_errors_become_service_errors() -> None:
    down = FakeClient(fail=ServerSelectionTimeoutError("h:1: refused, Timeout: 5s, Topology"))
    with pytest.raises(StoreUnavailableError) as caught:
        await db(down).find("c", {"a": 1})
    assert not isinstance(caught.value, RetryableError)
    assert "db.example:27017" in str(caught.value) and "Topology" not in str(caught.value)
    refused = FakeClient(fail=OperationFailure("unknown operator: $foo"))
    with pytest.raises(StoreError, match=r"\[ctx\.db\.find\] .* refused .*unknown operator"):
        await db(refused).find("c", {"a": {"$foo": 1}})
    confused = FakeClient(fail=KeyError("payload"))
    with pytest.raises(StoreError, match="KeyError"):
        await db(confused).save("c", {"a": 1})


async def test_a_store_that_never_answers_times_out() -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match=r"did not answer within 0\.1 s"):
        await db(FakeClient(hang=True), timeout_s=0.1).save("c", {"a": 1})
    assert time.monotonic() - started < 3


# --- ctx.prediction ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"predicted_value": "a", "true_value": "b", "error": "bad"}, "error"),
        ({"predicted_value": "a", "true_value": "b", "error": None}, "error"),
        ({"predicted_value": "", "true_value": "b"}, "predicted_value"),
        ({"predicted_value": None, "true_value": "b"}, "predicted_value"),
        ({"predicted_value": 1, "true_value": "b"}, "predicted_value"),
        ({"predicted_value": "a", "true_value": ""}, "true_value"),
        ({"predicted_value": "a"}, "true_value"),
        ({"error": "missing_values", "predicted_value": None}, "predicted_value"),
        ({"predicted_value": "a", "true_value": "b", "extra": [1]}, "extra"),
        ({"predicted_value": "a", "true_value": "b", "utcdate": "2024-01-01"}, "utcdate"),
        (
            {
                "predicted_value": "a",
                "true_value": "b",
                "utcdate": datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=2))),
            },
            "utcdate",
        ),
    ],
)
async def test_prediction_save_refuses(kwargs: dict[str, Any], argument: str) -> None:
    client = FakeClient()
    pattern = "^" + re.escape(f"[ctx.prediction.save] invalid '{argument}'=")
    with pytest.raises(ServiceArgumentError, match=pattern):
        await prediction(client).save(**kwargs)
    assert client.calls == []


def test_prediction_error_message_lists_the_allowed_errors() -> None:
    with pytest.raises(ServiceArgumentError) as caught:
        prediction_document("a", "b", None, None, "oops", version_id="i", version_name="v")
    assert str(caught.value) == (
        "[ctx.prediction.save] invalid 'error'='oops', must be '' or one of "
        "'missing_values', 'new_labels'"
    )


async def test_prediction_document_is_kre_s() -> None:
    client = FakeClient()
    await prediction(client).save("cat", "dog", {"score": 0.9}, MOMENT)
    assert client.calls == [
        (
            "insert_one",
            {
                "date": "2024-01-02T03:04:05.678901Z",
                "error": "",
                "predictedValue": "cat",
                "trueValue": "dog",
                "extra": {"score": 0.9},
                "versionId": "vid-1",
                "versionName": "v1",
            },
        )
    ]


@pytest.mark.parametrize(
    "utcdate",
    [
        datetime(2024, 1, 2, 3, 4, 5, 678901),  # naive: taken as UTC
        MOMENT,
        MOMENT.replace(tzinfo=timezone(timedelta(0), "Z")),
    ],
)
def test_prediction_date_is_rfc3339_with_microseconds(utcdate: datetime) -> None:
    doc = prediction_document("a", "b", None, utcdate, "", version_id="i", version_name="v")
    assert doc["date"] == "2024-01-02T03:04:05.678901Z"


def test_prediction_date_defaults_to_now_and_errors_allow_empty_values() -> None:
    doc = prediction_document("", "", None, None, "new_labels", version_id="i", version_name="v")
    date = datetime.strptime(doc["date"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert abs(datetime.now(UTC) - date) < timedelta(seconds=5)
    assert (doc["error"], doc["predictedValue"], doc["trueValue"]) == ("new_labels", "", "")


# --- ctx.measurement: arguments ---------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "argument"),
    [
        (("", {"v": 1}, {}), "measurement"),
        ((None, {"v": 1}, {}), "measurement"),
        ((5, {"v": 1}, {}), "measurement"),
        (("m", {}, {}), "fields"),
        (("m", None, {}), "fields"),
        (("m", [("v", 1)], {}), "fields"),
        (("m", {"": 1}, {}), "fields"),
        (("m", {5: 1}, {}), "fields"),
        (("m", {"time": 1}, {}), "fields"),
        (("m", {"v": None}, {}), "fields['v']"),
        (("m", {"v": [1]}, {}), "fields['v']"),
        (("m", {"v": b"x"}, {}), "fields['v']"),
        (("m", {"v": math.nan}, {}), "fields['v']"),
        (("m", {"v": math.inf}, {}), "fields['v']"),
        (("m", {"v": 2**63}, {}), "fields['v']"),
        (("m", {"v": object()}, {}), "fields['v']"),
        (("m", {"v": 1}, "host=a"), "tags"),
        (("m", {"v": 1}, [("host", "a")]), "tags"),
        (("m", {"v": 1}, {"": "a"}), "tags"),
        (("m", {"v": 1}, {"_field": "a"}), "tags"),
        (("m", {"v": 1}, {"host": ""}), "tags['host']"),
        (("m", {"v": 1}, {"host": None}), "tags['host']"),
        (("m", {"v": 1}, {"host": ["a"]}), "tags['host']"),
        (("m", {"v": 1}, {}, "2024-01-01"), "time"),
        (("m", {"v": 1}, {}, 1.5), "time"),
        (("m", {"v": 1}, {}, True), "time"),
        (("m", {"v": 1}, {}, None, "h"), "precision"),
        (("m", {"v": 1}, {}, None, "NS"), "precision"),
        (("m", {"v": 1}, {}, None, None), "precision"),
    ],
)
def test_measurement_save_refuses(args: tuple[Any, ...], argument: str) -> None:
    measurement, sink = measurements()
    pattern = "^" + re.escape(f"[ctx.measurement.save] invalid '{argument}'=")
    with pytest.raises(ServiceArgumentError, match=pattern):
        measurement.save(*args)
    assert sink.lines == []


def test_measurement_precision_constants_are_influx_s() -> None:
    measurement, _ = measurements()
    assert (
        measurement.PRECISION_S,
        measurement.PRECISION_MS,
        measurement.PRECISION_US,
        measurement.PRECISION_NS,
    ) == ("s", "ms", "us", "ns")
    assert Measurements.PRECISION_NS == "ns"


# --- ctx.measurement: exact lines -------------------------------------------------------


def test_line_protocol_types_and_escaping() -> None:
    fields: dict[str, Any] = {
        "text": 'he said "hi" \\ ok',
        "count": 3,
        "ok": True,
        "off": False,
        "ratio": 1.5,
        "whole": 2.0,
        "neg": -7,
        "field key": "a,b=c",
    }
    tags = {"host name": "a,b=c", "zone": "eu west"}
    line = line_protocol("cpu load,x", fields, tags, MOMENT)
    assert line == (
        r"cpu\ load\,x,host\ name=a\,b\=c,zone=eu\ west "
        r'count=3i,field\ key="a,b=c",neg=-7i,off=false,ok=true,ratio=1.5,'
        r'text="he said \"hi\" \\ ok",whole=2 '
        "1704164645678901000"
    )


@pytest.mark.parametrize(
    ("precision", "stamp"),
    [
        ("s", SECONDS),
        ("ms", SECONDS * 10**3 + 678),
        ("us", SECONDS * 10**6 + 678901),
        ("ns", SECONDS * 10**9 + 678901000),
    ],
)
def test_line_protocol_timestamp_in_each_precision(precision: str, stamp: int) -> None:
    assert line_protocol("m", {"v": 1}, {}, MOMENT, precision) == f"m v=1i {stamp}"
    naive = MOMENT.replace(tzinfo=None)
    assert line_protocol("m", {"v": 1}, {}, naive, precision) == f"m v=1i {stamp}"
    paris = MOMENT.astimezone(timezone(timedelta(hours=1)))
    assert line_protocol("m", {"v": 1}, {}, paris, precision) == f"m v=1i {stamp}"


def test_line_protocol_int_time_is_taken_as_is_and_none_is_now() -> None:
    assert line_protocol("m", {"v": 1}, None, 12345, "s") == "m v=1i 12345"
    before = time.time_ns()
    stamp = int(line_protocol("m", {"v": 1}).rsplit(" ", 1)[1])
    assert before <= stamp <= time.time_ns()


def test_measurement_save_adds_the_version_tag_and_keeps_the_precision() -> None:
    measurement, sink = measurements()
    measurement.save("cpu", {"load": 0.5}, {"host": "a", "version": "mine"}, MOMENT, "ms")
    measurement.save("cpu", {"load": 1}, {}, MOMENT, measurement.PRECISION_S)
    assert sink.lines == [
        ("ms", f"cpu,host=a,version=v1 load=0.5 {SECONDS * 1000 + 678}"),
        ("s", f"cpu,version=v1 load=1i {SECONDS}"),
    ]


def test_measurement_save_converts_other_numbers_to_builtins() -> None:
    # numbers.Real and numbers.Integral (numpy's scalars register as both) are converted.
    fields: dict[str, Any] = {"f": Fraction(1, 2)}
    line = line_protocol("m", fields, {}, 7)
    assert line == "m f=0.5 7"


def test_record_node_elapsed_writes_kre_s_points() -> None:
    measurement, sink = measurements()
    start = datetime(2024, 1, 1, 0, 0, 1)
    measurement.record_node_elapsed(
        tracking_id="t-1",
        node_from="n1",
        start=start,
        end=start + timedelta(milliseconds=250),
        previous_end=start - timedelta(milliseconds=40),
        workflow_start=(start - timedelta(seconds=1)).replace(tzinfo=UTC),
    )
    lines = [line.rsplit(" ", 1)[0] for _, line in sink.lines]
    assert lines == [
        'node_elapsed_time,node=n2,version=v1,workflow=wf elapsed_ms=250,node_from="n1",'
        'tracking_id="t-1",waiting_ms=40',
        'workflow_elapsed_time,version=v1,workflow=wf elapsed_ms=1250,tracking_id="t-1"',
    ]
    assert [precision for precision, _ in sink.lines] == ["ns", "ns"]


def test_record_node_elapsed_not_last_node_and_no_previous() -> None:
    measurement, sink = measurements()
    start = datetime(2024, 1, 1, tzinfo=UTC)
    measurement.record_node_elapsed(tracking_id="t", node_from="", start=start, end=start)
    assert len(sink.lines) == 1
    assert sink.lines[0][1].startswith(
        'node_elapsed_time,node=n2,version=v1,workflow=wf elapsed_ms=0,node_from="",'
        'tracking_id="t",waiting_ms=0 '
    )


# --- settings ---------------------------------------------------------------------------


def test_settings_defaults_and_empty_values() -> None:
    settings = ServiceSettings.from_env({"KRT_MONGO_URI": "", "KRT_INFLUX_BUCKET": " "})
    assert settings == ServiceSettings()
    assert (settings.mongo_uri, settings.influx_uri) == (None, None)
    assert (settings.mongo_db, settings.mongo_timeout_s, settings.influx_bucket) == (
        "data",
        5.0,
        "kre",
    )


def test_influx_bucket_defaults_to_the_runtime_id_as_in_kre_py() -> None:
    runtime = {"KRT_RUNTIME_ID": "runtime1"}
    assert ServiceSettings.from_env(runtime).influx_bucket == "runtime1"
    chosen = ServiceSettings.from_env({**runtime, "KRT_INFLUX_BUCKET": "kre/autogen"})
    assert chosen.influx_bucket == "kre/autogen"


def test_settings_read_every_variable() -> None:
    settings = ServiceSettings.from_env(
        {
            "KRT_MONGO_URI": "mongodb://u:p@h:1/",
            "KRT_MONGO_DB": "metrics",
            "KRT_MONGO_TIMEOUT": "2.5",
            "KRT_INFLUX_URI": "http://influx:8086",
            "KRT_INFLUX_BUCKET": "kre/autogen",
            "KRT_INFLUX_ORG": "org",
            "KRT_INFLUX_TOKEN": "user:secret",
            "KRT_NATS_MONGO_WRITER": "mongo_writer",
        }
    )
    assert settings.mongo_timeout_s == 2.5
    assert settings.influx_bucket == "kre/autogen"
    assert settings.nats_mongo_writer == "mongo_writer"
    shown = repr(settings) + str(settings.summary())
    assert "secret" not in shown and ":p@" not in shown
    assert settings.summary()["mongo_uri"] == "mongodb://u:***@h:1/"
    assert settings.summary()["influx_token"] == "***"


def test_settings_list_every_invalid_value_at_once() -> None:
    with pytest.raises(SettingsError) as caught:
        ServiceSettings.from_env(
            {
                "KRT_MONGO_TIMEOUT": "soon",
                "KRT_MONGO_DB": "a.b",
                "KRT_INFLUX_URI": "influx:8086",
            }
        )
    text = str(caught.value)
    assert "KRT_MONGO_TIMEOUT='soon'" in text
    assert "KRT_MONGO_DB='a.b'" in text
    assert "KRT_INFLUX_URI='influx:8086'" in text


@pytest.mark.parametrize("raw", ["0", "-1", "nan", "inf"])
def test_settings_refuse_a_timeout_that_is_not_positive(raw: str) -> None:
    with pytest.raises(SettingsError, match="KRT_MONGO_TIMEOUT"):
        ServiceSettings.from_env({"KRT_MONGO_TIMEOUT": raw})


@pytest.mark.parametrize(
    ("uri", "masked"),
    [
        (
            "mongodb://user:s3cr%40t@h1:1,h2:2/db?authSource=admin",
            "mongodb://user:***@h1:1,h2:2/db",
        ),
        ("mongodb+srv://user:p@cluster.example/", "mongodb+srv://user:***@cluster.example/"),
        ("mongodb://h:1/", "mongodb://h:1/"),
        ("http://influx:8086?token=abc", "http://influx:8086?token=***"),
    ],
)
def test_mask_uri_hides_passwords(uri: str, masked: str) -> None:
    assert mask_uri(uri).startswith(masked)
    assert "s3cr" not in mask_uri(uri) and "abc" not in mask_uri(uri)


async def test_services_without_uris_have_no_stores_and_close_cleanly() -> None:
    services = Services.from_settings(ServiceSettings(), "i", "v", "w", "n")
    assert (services.db, services.prediction, services.measurement) == (None, None, None)
    services.record_node_elapsed(
        tracking_id="t", node_from="a", start=MOMENT, end=MOMENT, previous_end=MOMENT
    )
    await services.close()
    await services.close()


async def test_services_with_a_bad_mongo_uri_fail_at_start_with_the_password_masked() -> None:
    settings = ServiceSettings(mongo_uri="mongodb://user:hunter2@h:notaport/")
    with pytest.raises(SettingsError) as caught:
        Services.from_settings(settings, "i", "v", "w", "n")
    assert "hunter2" not in str(caught.value)
    assert "user:***@" in str(caught.value)


async def test_services_build_without_connecting() -> None:
    # Nothing listens on port 1: building (and closing) must not need the servers.
    settings = ServiceSettings(mongo_uri="mongodb://127.0.0.1:1/", influx_uri="http://127.0.0.1:1")
    started = time.monotonic()
    services = Services.from_settings(settings, "i", "v", "w", "n")
    assert services.db is not None and services.prediction is not None
    assert services.measurement is not None
    await services.close()
    assert time.monotonic() - started < 2
