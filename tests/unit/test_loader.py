"""load_user_code: three different mistakes give three different, useful errors."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from handler_host.errors import HandlerFileNotFound, HandlerImportError, MissingHandlerError
from handler_host.loader import is_async_callable, load_user_code


@pytest.fixture(autouse=True)
def _restore_sys_path() -> Iterator[None]:
    saved = list(sys.path)
    yield
    sys.path[:] = saved


def write(folder: Path, name: str, code: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(code))
    return path


def test_file_not_found_names_every_part(tmp_path: Path) -> None:
    with pytest.raises(HandlerFileNotFound) as caught:
        load_user_code(str(tmp_path), "src/missing.py")

    error = caught.value
    assert error.path == tmp_path / "src" / "missing.py"
    message = str(error)
    assert str(tmp_path / "src" / "missing.py") in message
    assert f"KRT_BASE_PATH={str(tmp_path)!r}" in message
    assert "KRT_HANDLER_PATH='src/missing.py'" in message
    assert "does not exist" in message


def test_base_path_that_is_not_a_folder_is_said(tmp_path: Path) -> None:
    with pytest.raises(HandlerFileNotFound, match=r"KRT_BASE_PATH .* is not a folder"):
        load_user_code(str(tmp_path / "nope"), "handler.py")


def test_handler_path_that_is_a_folder(tmp_path: Path) -> None:
    (tmp_path / "handler.py").mkdir()
    with pytest.raises(HandlerFileNotFound, match="is not a file"):
        load_user_code(str(tmp_path), "handler.py")


def test_not_a_python_file(tmp_path: Path) -> None:
    write(tmp_path, "handler.txt", "def handler(ctx, data): pass\n")
    with pytest.raises(HandlerFileNotFound, match=r"is not a \.py file"):
        load_user_code(str(tmp_path), "handler.txt")


def test_module_raising_on_import(tmp_path: Path) -> None:
    write(
        tmp_path,
        "handler.py",
        """
        def load_model():
            raise RuntimeError("model weights are corrupt")

        MODEL = load_model()

        def handler(ctx, data):
            return None
        """,
    )

    with pytest.raises(HandlerImportError) as caught:
        load_user_code(str(tmp_path), "handler.py")

    error = caught.value
    assert isinstance(error.cause, RuntimeError)
    message = str(error)
    assert "raised RuntimeError while being imported" in message
    assert "model weights are corrupt" in message
    assert "Traceback (most recent call last)" in error.traceback
    assert 'handler.py", line 5, in <module>' in error.traceback
    assert "in load_model" in error.traceback
    assert error.traceback in message
    # The traceback starts in the user's file: the loader's own frames are left out.
    assert "loader.py" not in error.traceback
    assert "importlib" not in error.traceback


def test_missing_import_gets_a_hint(tmp_path: Path) -> None:
    write(tmp_path, "handler.py", "import no_such_module_kre_test\n")

    with pytest.raises(HandlerImportError) as caught:
        load_user_code(str(tmp_path), "handler.py")

    message = str(caught.value)
    assert "ModuleNotFoundError" in message
    assert "'no_such_module_kre_test'" in message
    assert str(tmp_path) in message


def test_syntax_error_is_an_import_error(tmp_path: Path) -> None:
    write(tmp_path, "handler.py", "def handler(ctx, data)\n    return None\n")

    with pytest.raises(HandlerImportError) as caught:
        load_user_code(str(tmp_path), "handler.py")

    assert isinstance(caught.value.cause, SyntaxError)
    assert "handler.py" in caught.value.traceback


def test_failed_import_leaves_no_module_behind(tmp_path: Path) -> None:
    write(tmp_path, "handler.py", "raise ValueError('boom')\n")
    before = set(sys.modules)
    with pytest.raises(HandlerImportError):
        load_user_code(str(tmp_path), "handler.py")
    assert not {name for name in set(sys.modules) - before if name.startswith("kre_user")}


def test_no_handler(tmp_path: Path) -> None:
    write(tmp_path, "handler.py", "def init(ctx):\n    pass\n")

    with pytest.raises(MissingHandlerError) as caught:
        load_user_code(str(tmp_path), "handler.py")

    assert "does not define handler" in str(caught.value)
    assert "def handler(ctx, data)" in str(caught.value)


def test_handler_not_callable(tmp_path: Path) -> None:
    write(tmp_path, "handler.py", "handler = 42\n")

    with pytest.raises(MissingHandlerError) as caught:
        load_user_code(str(tmp_path), "handler.py")

    assert "defines handler as a int, which is not callable" in str(caught.value)


@pytest.mark.parametrize(
    ("code", "handler_async", "init_async", "has_init"),
    [
        ("def handler(ctx, data): pass\n", False, False, False),
        ("async def handler(ctx, data): pass\n", True, False, False),
        ("def init(ctx): pass\nasync def handler(ctx, data): pass\n", True, False, True),
        ("async def init(ctx): pass\ndef handler(ctx, data): pass\n", False, True, True),
    ],
)
def test_sync_and_async_detection(
    tmp_path: Path, code: str, handler_async: bool, init_async: bool, has_init: bool
) -> None:
    write(tmp_path, "handler.py", code)

    user_code = load_user_code(str(tmp_path), "handler.py")

    assert user_code.handler_is_async is handler_async
    assert user_code.init_is_async is init_async
    assert (user_code.init is not None) is has_init
    assert user_code.path == tmp_path / "handler.py"


def test_async_callable_object_is_async() -> None:
    class Handler:
        async def __call__(self, ctx: object, data: object) -> None:
            return None

    assert is_async_callable(Handler())
    assert not is_async_callable(print)


def test_sibling_module_imports_like_a_pb2(tmp_path: Path) -> None:
    sibling = f"sibling_{uuid.uuid4().hex}_pb2"
    write(tmp_path / "src", f"{sibling}.py", "class Request:\n    kind = 'request'\n")
    write(
        tmp_path / "src",
        "handler.py",
        f"from {sibling} import Request\n\ndef handler(ctx, data):\n    return Request.kind\n",
    )

    user_code = load_user_code(str(tmp_path), "src/handler.py")

    assert user_code.handler(None, None) == "request"
    assert sys.path[0] == str(tmp_path / "src")


def test_absolute_handler_path(tmp_path: Path) -> None:
    path = write(tmp_path, "abs_handler.py", "def handler(ctx, data): return 'abs'\n")

    user_code = load_user_code("/somewhere/else", str(path))

    assert user_code.handler(None, None) == "abs"


def test_each_load_gets_a_unique_module(tmp_path: Path) -> None:
    write(tmp_path, "handler.py", "def handler(ctx, data): pass\n")

    first = load_user_code(str(tmp_path), "handler.py")
    second = load_user_code(str(tmp_path), "handler.py")

    assert first.module.__name__ != second.module.__name__
    assert first.module.__name__ != "handler"
    assert sys.modules[first.module.__name__] is first.module
