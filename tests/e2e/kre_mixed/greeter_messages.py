"""The greeter's Request and Response, for the three handlers of this folder.

Both runners put a handler's folder on sys.path, so the handlers import this module by
name; it takes the generated module from examples/greeter rather than a second copy.
"""

import sys
from pathlib import Path

_GREETER = str(Path(__file__).resolve().parents[3] / "examples" / "greeter")
if _GREETER not in sys.path:
    sys.path.append(_GREETER)

from public_input_pb2 import Request, Response  # noqa: E402

__all__ = ["Request", "Response"]
