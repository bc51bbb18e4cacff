"""handler_host.testing's in-memory stores: the real argument checks, Mongo-like queries."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from handler_host.services import ServiceArgumentError, StoreError
from handler_host.testing import InMemoryStores


@pytest.fixture
def stores() -> InMemoryStores:
    return InMemoryStores(version_id="v-id", version_name="v1")


async def test_save_copies_through_bson_like_mongodb(stores: InMemoryStores) -> None:
    data = {"name": "a", "at": datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC), "t": (1, 2)}

    await stores.db.save("rows", data)

    assert "_id" not in data  # the caller's dict is left alone
    (doc,) = await stores.db.find("rows", {"name": "a"})
    assert doc["at"] == datetime(2024, 5, 1, 12, 0, 0, 123000)  # naive UTC, milliseconds
    assert doc["t"] == [1, 2]
    doc["name"] = "changed"
    assert (await stores.db.find("rows", {"name": "a"}))[0]["name"] == "a"


async def test_find_operators(stores: InMemoryStores) -> None:
    for n in range(5):
        await stores.db.save(
            "rows", {"n": n, "tags": ["even" if n % 2 == 0 else "odd"], "d": {"k": n}}
        )

    async def ns(query: dict[str, object]) -> list[int]:
        return [doc["n"] for doc in await stores.db.find("rows", query)]

    assert await ns({"n": {"$gt": 1, "$lt": 4}}) == [2, 3]
    assert await ns({"n": {"$gte": 3}}) == [3, 4]
    assert await ns({"n": {"$lte": 0}}) == [0]
    assert await ns({"n": {"$in": [1, 4, 9]}}) == [1, 4]
    assert await ns({"n": {"$nin": [0, 1, 2]}}) == [3, 4]
    assert await ns({"n": {"$ne": 2}, "tags": "even"}) == [0, 4]
    assert await ns({"d.k": 3}) == [3]
    assert await ns({"$or": [{"n": 0}, {"n": 4}]}) == [0, 4]
    assert await ns({"$and": [{"n": {"$gt": 0}}, {"tags": "odd"}]}) == [1, 3]
    assert await ns({"missing": {"$exists": False}, "n": {"$eq": 1}}) == [1]
    assert await ns({"n": {"$gt": "text"}}) == []  # other type: no match, as in MongoDB


async def test_aware_datetimes_in_queries(stores: InMemoryStores) -> None:
    noon = datetime(2024, 5, 1, 12, tzinfo=UTC)
    await stores.db.save("events", {"at": noon})
    later = noon.astimezone(timezone(timedelta(hours=2))) - timedelta(minutes=1)
    assert len(await stores.db.find("events", {"at": {"$gt": later}})) == 1


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda db: db.save("", {}), "collection"),
        (lambda db: db.save("system.users", {}), "collection"),
        (lambda db: db.save("rows", [1]), "data"),
        (lambda db: db.save("rows", {"s": {1, 2}}), "data"),
        (lambda db: db.find("rows", {}), "query"),
        (lambda db: db.find("rows", {"n": {"$regex": "a"}}), "query"),
        (lambda db: db.find("rows", {"$where": "1"}), "query"),
    ],
)
async def test_invalid_arguments_raise_like_the_real_store(
    stores: InMemoryStores, call: object, argument: str
) -> None:
    with pytest.raises(ServiceArgumentError) as raised:
        await call(stores.db)  # type: ignore[operator]
    assert raised.value.argument == argument


async def test_duplicate_id_is_refused(stores: InMemoryStores) -> None:
    await stores.db.save("rows", {"_id": 1})
    with pytest.raises(StoreError, match="duplicate key"):
        await stores.db.save("rows", {"_id": 1})


async def test_prediction_documents_are_kre_shaped(stores: InMemoryStores) -> None:
    await stores.prediction.save("cat", "dog", extra={"p": 0.9}, utcdate=datetime(2024, 5, 1))
    with pytest.raises(ServiceArgumentError):
        await stores.prediction.save("", "dog")
    with pytest.raises(ServiceArgumentError):
        await stores.prediction.save(error="other")

    (doc,) = stores.prediction.docs
    assert doc["date"] == "2024-05-01T00:00:00.000000Z"
    assert (doc["predictedValue"], doc["trueValue"], doc["extra"]) == ("cat", "dog", {"p": 0.9})
    assert (doc["versionId"], doc["versionName"]) == ("v-id", "v1")
    assert await stores.db.find("classificationMetrics", {"predictedValue": "cat"})


def test_measurements_are_checked_and_recorded(stores: InMemoryStores) -> None:
    stores.measurement.save("m", {"x": 1.5, "s": "a b"}, {"t": "1"}, time=7, precision="s")
    with pytest.raises(ServiceArgumentError):
        stores.measurement.save("m", {}, None)
    with pytest.raises(ServiceArgumentError):
        stores.measurement.save("m", {"x": 1}, None, precision="hours")

    (point,) = stores.measurement.points
    assert point.tags == {"t": "1", "version": "v1"}
    assert (point.timestamp, point.precision) == (7, "s")
    assert point.line == 'm,t=1,version=v1 s="a b",x=1.5 7'
    assert stores.measurement.stats.accepted == 1
