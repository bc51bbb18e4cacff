"""The sync CPU-bound handler runs in the thread pool, and the host stays responsive."""

import asyncio
import hashlib
from pathlib import Path

from google.protobuf.struct_pb2 import Struct
from grpc_health.v1 import health_pb2, health_pb2_grpc

HANDLER = Path(__file__).with_name("handler.py")


def request(text: str, rounds: int) -> Struct:
    message = Struct()
    message.update({"text": text, "rounds": rounds})
    return message


async def test_hashes_in_a_handler_thread(start_node) -> None:
    node = await start_node(HANDLER)

    reply = await node.call(request("secret", 1000), Struct)

    expected = hashlib.pbkdf2_hmac("sha256", b"secret", b"kre-cpu-sync", 1000).hex()
    assert reply["digest"] == expected
    assert reply["thread"].startswith("kre-handler")


async def test_the_host_answers_while_the_handler_works(start_node) -> None:
    node = await start_node(HANDLER)
    health = health_pb2_grpc.HealthStub(node.channel)

    work = asyncio.create_task(node.call(request("slow", 2_000_000), Struct))
    await asyncio.sleep(0.05)  # let the delivery reach its thread
    check = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)

    assert check.status == health_pb2.HealthCheckResponse.SERVING
    assert not work.done(), "the health check should not have waited for the hash"
    assert (await work)["rounds"] == 2_000_000


async def test_two_threads_run_two_messages(start_node) -> None:
    node = await start_node(HANDLER, handler_threads=2)

    replies = await asyncio.gather(*(node.call(request(t, 20_000), Struct) for t in "ab"))

    assert [r["digest"][:8] for r in replies] == [
        hashlib.pbkdf2_hmac("sha256", t.encode(), b"kre-cpu-sync", 20_000).hex()[:8] for t in "ab"
    ]
