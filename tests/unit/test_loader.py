"""load_user_code: three different mistakes give three different, useful errors."""

from __future__ import annotations

import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf.internal import api_implementation

from handler_host.errors import (
    HandlerFileNotFound,
    HandlerImportError,
    MissingHandlerError,
    OutdatedPb2Error,
)
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


# old_style.proto (package kre_old_style, message Request { string name = 1; }) as
# protoc 3.12-3.18 compiled it: descriptors built by hand, which protobuf >= 4.21 refuses
# under its C implementation.
OLD_STYLE_PB2 = r'''# -*- coding: utf-8 -*-
# Generated by the protocol buffer compiler.  DO NOT EDIT!
# source: old_style.proto
"""Generated protocol buffer code."""
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf import reflection as _reflection
from google.protobuf import symbol_database as _symbol_database
# @@protoc_insertion_point(imports)

_sym_db = _symbol_database.Default()




DESCRIPTOR = _descriptor.FileDescriptor(
  name='old_style.proto',
  package='kre_old_style',
  syntax='proto3',
  serialized_options=None,
  create_key=_descriptor._internal_create_key,
  serialized_pb=b'\n\x0fold_style.proto\x12\rkre_old_style\"\x17\n\x07Request\x12\x0c\n\x04name\x18\x01 \x01(\tb\x06proto3'
)




_REQUEST = _descriptor.Descriptor(
  name='Request',
  full_name='kre_old_style.Request',
  filename=None,
  file=DESCRIPTOR,
  containing_type=None,
  create_key=_descriptor._internal_create_key,
  fields=[
    _descriptor.FieldDescriptor(
      name='name', full_name='kre_old_style.Request.name', index=0,
      number=1, type=9, cpp_type=9, label=1,
      has_default_value=False, default_value=b"".decode('utf-8'),
      message_type=None, enum_type=None, containing_type=None,
      is_extension=False, extension_scope=None,
      serialized_options=None, file=DESCRIPTOR,  create_key=_descriptor._internal_create_key),
  ],
  extensions=[
  ],
  nested_types=[],
  enum_types=[
  ],
  serialized_options=None,
  is_extendable=False,
  syntax='proto3',
  extension_ranges=[],
  oneofs=[
  ],
  serialized_start=34,
  serialized_end=57,
)

DESCRIPTOR.message_types_by_name['Request'] = _REQUEST
_sym_db.RegisterFileDescriptor(DESCRIPTOR)

Request = _reflection.GeneratedProtocolMessageType('Request', (_message.Message,), {
  'DESCRIPTOR' : _REQUEST,
  '__module__' : 'old_style_pb2'
  # @@protoc_insertion_point(class_scope:kre_old_style.Request)
  })
_sym_db.RegisterMessage(Request)


# @@protoc_insertion_point(module_scope)
'''  # noqa: E501

needs_upb = pytest.mark.skipif(
    api_implementation.Type() == "python",
    reason="the pure-Python protobuf loads pre-3.19 generated code",
)


def write_old_style(folder: Path, handler_code: str) -> Path:
    """``old_style_pb2.py`` and a handler beside it; the handler's path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "old_style_pb2.py").write_text(OLD_STYLE_PB2)
    return write(folder, "handler.py", handler_code)


@needs_upb
def test_pre_3_19_pb2_says_to_regenerate_it(tmp_path: Path) -> None:
    write_old_style(
        tmp_path / "src",
        "from old_style_pb2 import Request\n\ndef handler(ctx, data):\n    return None\n",
    )

    with pytest.raises(OutdatedPb2Error) as caught:
        load_user_code(str(tmp_path), "src/handler.py")

    error = caught.value
    assert isinstance(error, HandlerImportError)
    assert isinstance(error.cause, TypeError)
    assert error.pb2_path == tmp_path / "src" / "old_style_pb2.py"
    message = str(error)
    assert "\n" not in message
    assert (
        f"{str(tmp_path / 'src' / 'old_style_pb2.py')!r} was generated by protoc older" in message
    )
    assert "regenerate the _pb2.py files" in message
    assert "python -m grpc_tools.protoc -I. --python_out=. old_style.proto" in message
    assert "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python" in message
    assert "Traceback" not in message
    assert "old_style_pb2.py" in error.traceback  # kept for whoever wants it


@needs_upb
def test_pre_3_19_pb2_behind_an_error_of_the_users_own(tmp_path: Path) -> None:
    write_old_style(
        tmp_path,
        """
        try:
            from old_style_pb2 import Request
        except TypeError as exc:
            raise RuntimeError("the protos did not load") from exc

        def handler(ctx, data):
            return None
        """,
    )

    with pytest.raises(OutdatedPb2Error) as caught:
        load_user_code(str(tmp_path), "handler.py")

    assert isinstance(caught.value.cause, RuntimeError)
    assert caught.value.pb2_path == tmp_path / "old_style_pb2.py"


def test_another_type_error_is_a_plain_import_error(tmp_path: Path) -> None:
    write(tmp_path, "handler.py", "LIMIT = 'ten' + 1\n")

    with pytest.raises(HandlerImportError) as caught:
        load_user_code(str(tmp_path), "handler.py")

    assert type(caught.value) is HandlerImportError
    assert "Traceback" in str(caught.value)


@pytest.mark.parametrize(
    ("raised", "name"),
    [
        ("raise KeyboardInterrupt", "KeyboardInterrupt"),
        ("import sys; sys.exit(3)", "SystemExit"),
        ("class Stop(BaseException): pass\nraise Stop('weights missing')", "Stop"),
    ],
)
def test_any_base_exception_on_import_is_an_import_error(
    tmp_path: Path, raised: str, name: str
) -> None:
    write(tmp_path, "handler.py", f"{raised}\ndef handler(ctx, data):\n    return None\n")
    before = set(sys.modules)

    with pytest.raises(HandlerImportError) as caught:
        load_user_code(str(tmp_path), "handler.py")

    assert type(caught.value.cause).__name__ == name
    assert str(caught.value).startswith(
        f"the handler module {str(tmp_path / 'handler.py')!r} raised {name} while being imported"
    )
    assert not {n for n in set(sys.modules) - before if n.startswith("kre_user")}
