"""The KRE README's form, `pickle.load(ctx.path(...))`, runs unchanged."""

import pickle
from pathlib import Path

import pytest
from google.protobuf.struct_pb2 import Struct

from handler_host.testing import HandlerFailed

HERE = Path(__file__).parent


def text(value: str) -> Struct:
    message = Struct()
    message.update({"text": value})
    return message


def test_the_data_file_is_the_tiny_pickle_the_example_expects() -> None:
    with open(HERE / "data" / "categories.pkl", "rb") as f:
        categories = pickle.load(f)
    assert set(categories) == {"sports", "weather", "tech"}


async def test_init_loads_the_pickle_through_ctx_path(start_node) -> None:
    node = await start_node(HERE / "handler.py")

    assert node.ctx.get("categories")["tech"][0] == "gpu"
    reply = await node.call(text("The team scored a late goal"), Struct)

    assert reply["category"] == "sports"
    assert reply["scores"]["sports"] == 3


async def test_unknown_and_empty_texts(start_node) -> None:
    node = await start_node(HERE / "handler.py")

    assert (await node.call(text("nothing to see")))["category"] == "unknown"
    with pytest.raises(HandlerFailed, match='needs a "text" string'):
        await node.call(Struct())
