"""The ctx API, exactly as KRE's README writes it, plus the per-message view."""

from __future__ import annotations

import gc
import logging
import os
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
from google.protobuf import any_pb2, wrappers_pb2

from handler_host.context import Context, ContextPath, MessageContext
from handler_host.errors import EarlyReplyError, RunnerError, ServiceNotConfigured
from handler_host.settings import HostSettings

CATEGORIES = {"a": 1, "b": [2, 3]}


@pytest.fixture
def base(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    with open(tmp_path / "data" / "categories.pkl", "wb") as f:
        pickle.dump(CATEGORIES, f)
    return tmp_path


@pytest.fixture
def ctx(base: Path) -> Context:
    return Context(str(base), node_name="normalizer", workflow_name="wf", version="v1")


class Emitted:
    def __init__(self) -> None:
        self.payloads: list[any_pb2.Any] = []

    async def __call__(self, payload: any_pb2.Any) -> None:
        self.payloads.append(payload)


def message_ctx(
    ctx: Context, *, replied: bool = False, emit: Emitted | None = None
) -> MessageContext:
    return ctx.for_message("track-1", replied=replied, emit_early=emit or Emitted())


def test_path_joins_base_path(ctx: Context, base: Path) -> None:
    path = ctx.path("data/categories.pkl")

    assert isinstance(path, str)
    assert isinstance(path, ContextPath)
    assert path == os.path.join(str(base), "data/categories.pkl")
    assert os.path.isabs(path)
    assert os.path.exists(path)
    assert Path(path) == base / "data" / "categories.pkl"
    assert path.endswith(".pkl")


def test_pickle_load_of_ctx_path_as_kre_readme_writes_it(ctx: Context) -> None:
    # The KRE README's init: ctx.set("categories", pickle.load(ctx.path("data/categories.pkl")))
    ctx.set("categories", pickle.load(ctx.path("data/categories.pkl")))

    assert ctx.get("categories") == CATEGORIES


def test_pickle_load_of_a_large_object_uses_readinto(ctx: Context, base: Path) -> None:
    big = {"blob": bytes(range(256)) * 4096, "array": bytearray(b"x" * 200_000)}
    with open(base / "data" / "big.pkl", "wb") as f:
        pickle.dump(big, f, protocol=5)

    assert pickle.load(ctx.path("data/big.pkl")) == big


def test_open_ctx_path(ctx: Context) -> None:
    with open(ctx.path("data/categories.pkl"), "rb") as f:
        assert pickle.load(f) == CATEGORIES


def test_each_ctx_path_reads_from_the_start(ctx: Context, base: Path) -> None:
    (base / "data" / "lines.txt").write_bytes(b"one\ntwo\n")
    first = ctx.path("data/lines.txt")

    assert first.readline() == b"one\n"
    assert first.read() == b"two\n"
    assert ctx.path("data/lines.txt").read(3) == b"one"
    first.close()
    with pytest.raises(ValueError, match="closed"):
        first.read()


def test_ctx_path_is_a_seekable_binary_file_for_libraries(ctx: Context, base: Path) -> None:
    # numpy.load, joblib.load and h5py.File check for ``read`` before treating their
    # argument as a path: they then read the magic bytes, seek back, and read again.
    (base / "data" / "array.bin").write_bytes(b"\x93NUMPY" + bytes(100))
    path = ctx.path("data/array.bin")

    assert hasattr(path, "read") and hasattr(path, "seek")
    assert (path.readable(), path.seekable(), path.writable()) == (True, True, False)
    assert path.peek(1)[:1] == b"\x93"
    assert path.read(6) == b"\x93NUMPY"
    assert path.tell() == 6
    path.seek(-6, os.SEEK_CUR)
    assert path.read(6) == b"\x93NUMPY"
    path.seek(0)
    assert len(path.read()) == 106
    assert path.name == str(path) and path.mode == "rb"
    assert not path.closed
    path.close()
    assert path.closed
    # Still a str in every other way: iteration yields characters, not lines.
    assert list(ctx.path("ab"))[-2:] == ["a", "b"]


def test_ctx_path_file_is_closed_as_soon_as_it_is_dropped(ctx: Context) -> None:
    path = ctx.path("data/categories.pkl")
    assert pickle.load(path) == CATEGORIES
    opened = path._file
    assert opened is not None and not opened.closed
    gc.disable()  # prove it is reference counting, not a cycle collection, that closes it
    try:
        del path
        assert opened.closed
    finally:
        gc.enable()


def test_ctx_path_copies_and_pickles_as_a_path(ctx: Context) -> None:
    path = ctx.path("data/categories.pkl")
    path.read(1)  # opens the file: the copy must not carry it

    restored = pickle.loads(pickle.dumps(path))

    assert restored == path
    assert restored.read() == Path(path).read_bytes()
    path.close()
    restored.close()


def test_get_and_set(ctx: Context) -> None:
    assert ctx.get("unknown") is None  # as KRE
    ctx.set("label", {"x": 1})
    assert ctx.get("label") == {"x": 1}


def test_message_context_shares_the_store(ctx: Context) -> None:
    ctx.set("from_init", 1)
    ctx.model = "a model"  # type: ignore[attr-defined]
    mctx = message_ctx(ctx)

    assert mctx.get("from_init") == 1
    mctx.set("from_handler", 2)
    assert ctx.get("from_handler") == 2
    assert mctx.path("x") == ctx.path("x")
    assert mctx.node_name == "normalizer"
    assert mctx.workflow_name == "wf"
    assert mctx.version == "v1"
    assert mctx.model == "a model"
    assert mctx.tracking_id == "track-1"
    assert ctx.tracking_id is None


@pytest.mark.parametrize(
    ("attribute", "env_var"),
    [("db", "KRT_MONGO_URI"), ("prediction", "KRT_MONGO_URI"), ("measurement", "KRT_INFLUX_URI")],
)
def test_unconfigured_service_says_what_to_set(ctx: Context, attribute: str, env_var: str) -> None:
    for target in (ctx, message_ctx(ctx)):
        with pytest.raises(ServiceNotConfigured) as caught:
            getattr(target, attribute)
        assert isinstance(caught.value, RunnerError)
        assert f"ctx.{attribute} needs {env_var}" in str(caught.value)


async def test_services_plug_in_and_close(base: Path) -> None:
    closed: list[bool] = []

    class Services(SimpleNamespace):
        async def aclose(self) -> None:
            closed.append(True)

    services = Services(db="db-client", prediction="pred", measurement=None)
    ctx = Context(str(base), services=services)

    assert ctx.db == "db-client"
    assert message_ctx(ctx).prediction == "pred"
    with pytest.raises(ServiceNotConfigured, match="KRT_INFLUX_URI"):
        _ = ctx.measurement
    await ctx.aclose()
    assert closed == [True]


async def test_services_with_a_sync_close(base: Path) -> None:
    closed: list[bool] = []
    services = SimpleNamespace(db=None, prediction=None, measurement=None)
    services.close = lambda: closed.append(True)  # type: ignore[attr-defined]

    await Context(str(base), services=services).aclose()  # type: ignore[arg-type]

    assert closed == [True]


def test_from_settings(base: Path) -> None:
    settings = HostSettings(
        base_path=str(base), handler_path="h.py", node_name="n", version_id="id"
    )
    ctx = Context.from_settings(settings)
    assert (ctx.base_path, ctx.node_name, ctx.version_id) == (str(base), "n", "id")


async def test_early_reply_packs_and_emits_once(ctx: Context) -> None:
    emit = Emitted()
    mctx = message_ctx(ctx, emit=emit)

    await mctx.early_reply(wrappers_pb2.StringValue(value="early"))

    assert len(emit.payloads) == 1
    unpacked = wrappers_pb2.StringValue()
    assert emit.payloads[0].Unpack(unpacked)
    assert unpacked.value == "early"
    with pytest.raises(EarlyReplyError, match="already called for this message"):
        await mctx.early_reply(wrappers_pb2.StringValue(value="again"))
    assert len(emit.payloads) == 1


async def test_early_reply_refused_when_input_already_replied(ctx: Context) -> None:
    emit = Emitted()
    mctx = message_ctx(ctx, replied=True, emit=emit)

    with pytest.raises(EarlyReplyError, match="already replied"):
        await mctx.early_reply(wrappers_pb2.StringValue(value="early"))
    assert emit.payloads == []


async def test_early_reply_after_the_handler_returned(ctx: Context) -> None:
    mctx = message_ctx(ctx)
    mctx.finish()
    with pytest.raises(EarlyReplyError, match="after the handler returned"):
        await mctx.early_reply(wrappers_pb2.StringValue(value="late"))


async def test_early_reply_needs_a_protobuf_message(ctx: Context) -> None:
    with pytest.raises(TypeError, match=r"expected a protobuf message, got a builtins\.dict"):
        await message_ctx(ctx).early_reply({"not": "protobuf"})  # type: ignore[arg-type]


def test_early_reply_from_a_sync_handler_raises(ctx: Context) -> None:
    # A sync handler runs in a worker thread, where there is no running event loop.
    with pytest.raises(EarlyReplyError, match="async def handler"):
        message_ctx(ctx).early_reply(wrappers_pb2.StringValue(value="x"))


async def test_early_reply_in_init_raises(ctx: Context) -> None:
    with pytest.raises(EarlyReplyError, match="only works inside handler"):
        await ctx.early_reply(wrappers_pb2.StringValue(value="x"))


def test_logger_carries_node_and_tracking_id(
    ctx: Context, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)

    message_ctx(ctx).logger.info("scored %d rows", 3)
    ctx.logger.info("loaded")

    first, second = caplog.records
    assert first.getMessage() == "[node=normalizer tracking_id=track-1] scored 3 rows"
    assert first.kre_tracking_id == "track-1"  # type: ignore[attr-defined]
    assert first.kre_node == "normalizer"  # type: ignore[attr-defined]
    assert second.getMessage() == "[node=normalizer] loaded"


def test_logger_keeps_the_callers_extra(ctx: Context, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    message_ctx(ctx).logger.info("x", extra={"rows": 3})
    assert caplog.records[0].rows == 3  # type: ignore[attr-defined]
    assert caplog.records[0].kre_tracking_id == "track-1"  # type: ignore[attr-defined]
