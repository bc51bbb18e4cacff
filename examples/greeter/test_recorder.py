"""The recorder (the demo's second node) with in-memory stores: what it saved."""

from pathlib import Path

import pytest
from public_input_pb2 import Response

from handler_host.testing import InMemoryStores

RECORDER = Path(__file__).with_name("recorder.py")


@pytest.fixture
async def stores():
    return InMemoryStores(version_id="v-1", version_name="demo-v1")


async def test_recorder_saves_to_the_three_stores(start_node, stores) -> None:
    node = await start_node(RECORDER, stores=stores)

    reply = await node.call(Response(greeting="Hola, Ada!"), Response, tracking_id="t-42")

    assert reply.greeting == "Hola, Ada!"  # passed on to the next node
    (saved,) = await stores.db.find("greetings", {"tracking_id": "t-42"})
    assert saved["greeting"] == "Hola, Ada!"
    assert "_id" in saved
    (prediction,) = stores.prediction.docs
    assert prediction["predictedValue"] == "es"
    assert prediction["trueValue"] == "en"
    assert prediction["versionName"] == "demo-v1"
    (point,) = stores.measurement.points
    assert (point.measurement, point.fields) == ("greetings", {"length": 10})
    assert point.tags == {"language": "es", "version": "demo-v1"}
    assert point.line.startswith("greetings,language=es,version=demo-v1 length=10i ")


async def test_find_with_operators(start_node, stores) -> None:
    node = await start_node(RECORDER, stores=stores)
    for greeting in ("Hello, Al!", "Bonjour, Marie-Claire!"):
        await node.call(Response(greeting=greeting), tracking_id=greeting)

    long_ones = await stores.db.find("greetings", {"greeting": {"$gt": "C"}})
    assert [doc["greeting"] for doc in long_ones] == ["Hello, Al!"]
    both = await stores.db.find("greetings", {"tracking_id": {"$in": ["Hello, Al!", "x"]}})
    assert len(both) == 1
