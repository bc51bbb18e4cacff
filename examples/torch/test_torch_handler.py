"""The torch example: CUDA when the machine has it, the CPU otherwise.

Skipped when torch is not installed (it is not part of `make test`: the wheel is large).
Run it in the torch image, or after `pip install torch`.
"""

import sys
from pathlib import Path

import pytest

torch = pytest.importorskip(
    "torch", reason="torch is not installed: `pip install torch` to run the torch example"
)

HERE = Path(__file__).parent
GREETER = HERE.parent / "greeter"  # the image copies the greeter's public_input_pb2 beside it


async def test_runs_on_cuda_when_available_else_cpu(start_node, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(GREETER))
    from public_input_pb2 import Request, Response

    node = await start_node(HERE / "handler.py")
    reply = await node.call(Request(name="Ada"), Response)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert node.ctx.get("device") == device
    assert reply.greeting.startswith(f"Hello, Ada! ({device}, score ")
    assert "public_input_pb2" in sys.modules
