"""Find, import and check the user's handler module, once, before the host serves."""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from handler_host.errors import HandlerFileNotFound, HandlerImportError, MissingHandlerError

logger = logging.getLogger(__name__)

_module_numbers = itertools.count(1)


@dataclass(frozen=True)
class UserCode:
    """The user's ``handler(ctx, data)`` and optional ``init(ctx)``, sync or async."""

    handler: Callable[..., Any]
    init: Callable[..., Any] | None
    module: ModuleType
    path: Path

    @property
    def handler_is_async(self) -> bool:
        return is_async_callable(self.handler)

    @property
    def init_is_async(self) -> bool:
        return self.init is not None and is_async_callable(self.init)


def load_user_code(base_path: str, handler_path: str) -> UserCode:
    """Import ``base_path/handler_path`` (an absolute ``handler_path`` is used as is).

    The handler file's folder goes to the front of ``sys.path`` first, so the module's
    siblings import directly (``from public_input_pb2 import Request``), as in KRE.

    Raises HandlerFileNotFound, HandlerImportError or MissingHandlerError: three
    different mistakes, three different messages.
    """
    path = _resolve(base_path, handler_path)
    module = _import(path)
    handler = getattr(module, "handler", None)
    if handler is None or not callable(handler):
        raise MissingHandlerError(path, handler)
    init = getattr(module, "init", None)
    if init is not None and not callable(init):
        init = None
        logger.warning("%s defines init but it is not callable: init is skipped", path)
    code = UserCode(handler=handler, init=init, module=module, path=path)
    logger.info(
        "loaded %s as module %s: %s handler, %s",
        path,
        module.__name__,
        "async" if code.handler_is_async else "sync",
        "no init" if init is None else ("async init" if code.init_is_async else "sync init"),
    )
    return code


def is_async_callable(fn: object) -> bool:
    """True for ``async def`` functions, partials of them and objects with ``async __call__``."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - the bound __call__ of an instance
    )


def _resolve(base_path: str, handler_path: str) -> Path:
    path = (Path(base_path) / handler_path).resolve()
    if not path.exists():
        reason = "does not exist"
        if not Path(base_path).is_dir():
            reason += f" (KRT_BASE_PATH {base_path!r} is not a folder either)"
        raise HandlerFileNotFound(path, base_path, handler_path, reason)
    if not path.is_file():
        raise HandlerFileNotFound(path, base_path, handler_path, "is not a file")
    if path.suffix != ".py":
        raise HandlerFileNotFound(path, base_path, handler_path, "is not a .py file")
    return path


def _import(path: Path) -> ModuleType:
    folder = str(path.parent)
    if not sys.path or sys.path[0] != folder:
        sys.path.insert(0, folder)
    # A unique name: the user's "handler.py" must not shadow or be shadowed by another
    # module called "handler" on sys.path.
    name = f"kre_user_handler_{next(_module_numbers)}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:  # only for a suffix _resolve already refused
        raise ImportError(f"no loader for {path}")
    module = importlib.util.module_from_spec(spec)
    # Registered before running it, as a normal import does: dataclasses and pickle
    # look their module up in sys.modules.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        del sys.modules[name]
        raise HandlerImportError(path, exc) from exc
    return module
