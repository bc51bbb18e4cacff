"""ctx.db and ctx.prediction against a real MongoDB wire-protocol server (nx-27017)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from deploy.local.mongo import MongoServer
from handler_host.services import ServiceArgumentError, Services, ServiceSettings, StoreError

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


@pytest.fixture
async def services(mongo_server: MongoServer) -> AsyncIterator[Services]:
    settings = ServiceSettings(mongo_uri=mongo_server.uri, mongo_timeout_s=5)
    built = Services.from_settings(settings, "vid-7", "v7", "wf", "node")
    yield built
    await built.close()


def without_id(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in doc.items() if k != "_id"} for doc in docs]


async def test_save_then_find_returns_what_was_saved(services: Services, unique: str) -> None:
    assert services.db is not None
    # BSON keeps milliseconds; PyMongo reads datetimes back naive, in UTC.
    when = datetime(2024, 5, 1, 12, 30, 45, 123000, tzinfo=UTC)
    doc = {
        "key": "nested",
        "nested": {"a": {"b": [1, 2.5, "x", {"c": None}]}, "flag": True},
        "when": when,
        "empty": {},
    }
    await services.db.save(unique, doc)
    found = await services.db.find(unique, {"key": "nested"})
    assert len(found) == 1
    assert "_id" in found[0]
    assert without_id(found) == [{**doc, "when": when.replace(tzinfo=None)}]


async def test_a_one_megabyte_document_round_trips(services: Services, unique: str) -> None:
    assert services.db is not None
    blob = "0123456789abcdef" * 65_536  # 1 MiB
    await services.db.save(unique, {"key": "big", "blob": blob})
    found = await services.db.find(unique, {"key": "big"})
    assert [doc["blob"] for doc in found] == [blob]


async def test_query_operators(services: Services, unique: str) -> None:
    assert services.db is not None
    for i in range(6):
        await services.db.save(unique, {"i": i, "label": f"l{i}", "group": i % 2})
    greater = await services.db.find(unique, {"i": {"$gt": 3}})
    assert sorted(doc["i"] for doc in greater) == [4, 5]
    among = await services.db.find(unique, {"label": {"$in": ["l1", "l4", "nope"]}})
    assert sorted(doc["i"] for doc in among) == [1, 4]
    both = await services.db.find(unique, {"i": {"$gt": 1}, "group": 0})
    assert sorted(doc["i"] for doc in both) == [2, 4]
    assert await services.db.find(unique, {"i": {"$gt": 99}}) == []


async def test_find_after_many_saves_returns_them_all(services: Services, unique: str) -> None:
    assert services.db is not None
    for i in range(250):  # more than a first batch of a cursor (101 documents)
        await services.db.save(unique, {"kind": "many", "i": i})
    found = await services.db.find(unique, {"kind": "many"})
    assert sorted(doc["i"] for doc in found) == list(range(250))


async def test_invalid_arguments_store_nothing(services: Services, unique: str) -> None:
    assert services.db is not None
    with pytest.raises(ServiceArgumentError):
        await services.db.save("", {"a": 1})
    with pytest.raises(ServiceArgumentError, match="must be encodable as BSON"):
        await services.db.save(unique, {"a": {1, 2}})
    assert await services.db.find(unique, {"a": {"$exists": True}}) == []


async def test_refusals_of_the_server_are_store_errors(services: Services, unique: str) -> None:
    assert services.db is not None
    await services.db.save(unique, {"_id": "one", "a": 1})
    with pytest.raises(StoreError, match=r"^\[ctx\.db\.save\] MongoDB at .* refused"):
        await services.db.save(unique, {"_id": "one", "a": 2})  # duplicate key
    with pytest.raises(StoreError, match=r"^\[ctx\.db\.find\] .*\$foo"):
        await services.db.find(unique, {"a": {"$foo": 1}})


async def test_prediction_documents_read_back_field_by_field(
    services: Services, mongo_server: MongoServer
) -> None:
    assert services.prediction is not None and services.db is not None
    date = datetime(2024, 2, 3, 4, 5, 6, 789012, tzinfo=UTC)
    before = datetime.now(UTC)
    await services.prediction.save("cat", "dog", {"score": 0.25, "model": "m1"}, date)
    await services.prediction.save(error="missing_values")
    await services.prediction.save("a", "b", utcdate=datetime(2024, 2, 3, 4, 5, 6))

    found = await services.db.find("classificationMetrics", {"versionId": "vid-7"})
    by_value = {doc["predictedValue"]: doc for doc in found}
    assert set(by_value) >= {"cat", "", "a"}

    first = by_value["cat"]
    assert first["date"] == "2024-02-03T04:05:06.789012Z"
    assert first["error"] == ""
    assert first["predictedValue"] == "cat"
    assert first["trueValue"] == "dog"
    assert first["extra"] == {"score": 0.25, "model": "m1"}
    assert first["versionId"] == "vid-7"
    assert first["versionName"] == "v7"
    assert set(first) == {
        "_id",
        "date",
        "error",
        "predictedValue",
        "trueValue",
        "extra",
        "versionId",
        "versionName",
    }

    missing = by_value[""]
    assert (missing["error"], missing["trueValue"], missing["extra"]) == (
        "missing_values",
        "",
        None,
    )
    stamped = datetime.strptime(missing["date"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert before - timedelta(seconds=1) <= stamped <= datetime.now(UTC) + timedelta(seconds=1)

    assert by_value["a"]["date"] == "2024-02-03T04:05:06.000000Z"


async def test_db_and_prediction_use_krt_mongo_db(mongo_server: MongoServer, unique: str) -> None:
    settings = ServiceSettings.from_env({"KRT_MONGO_URI": mongo_server.uri, "KRT_MONGO_DB": unique})
    services = Services.from_settings(settings, "vid-db", "v", "wf", "node")
    assert services.db is not None and services.prediction is not None
    try:
        await services.db.save("things", {"x": 1})
        await services.prediction.save("p", "t")
    finally:
        await services.close()

    direct: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_server.uri, timeoutMS=5000)
    try:
        database = direct[unique]
        assert without_id(await database["things"].find({}).to_list()) == [{"x": 1}]
        metrics = await database["classificationMetrics"].find({}).to_list()
        assert [doc["versionId"] for doc in metrics] == ["vid-db"]
        assert await direct["data"]["things"].find({"x": 1, "never": 1}).to_list() == []
    finally:
        await direct.close()
