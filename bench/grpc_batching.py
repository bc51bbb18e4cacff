"""What one gRPC stream message per delivery costs, against batching what is queued.

    python -m bench.grpc_batching [--n 20000] [--window 64]

The evidence behind "The gRPC hop" in docs/performance.md. A client and a server (its own
subprocess) over a Unix socket, both on uvloop when installed, shaped like the sidecar
and the handler host: the client keeps `window` Deliveries (100 B payload, packed in
Any) in flight on one bidirectional stream; the server runs each in a task that answers
with an Event holding a Result with the payload copied, as the echo handler does.

- `single`: one Delivery per request message, one Event per response message, as the
  `Process` contract does today;
- `batched`: each write takes everything queued at that moment, framed as
  length-prefixed serialized messages (a stand-in for `repeated Delivery` /
  `repeated Event` in the contract).

Printed: calls/s, and CPU microseconds per call in the client and in the server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.wrappers_pb2 import BytesValue

from bench.procstat import read
from deploy.local.procs import stop_process, wait_until
from protos import runner_pb2

METHOD = "/bench.Echo/Process"


def frame(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def unframe(data: bytes) -> list[bytes]:
    items, at = [], 0
    while at < len(data):
        (size,) = struct.unpack_from("<I", data, at)
        items.append(data[at + 4 : at + 4 + size])
        at += 4 + size
    return items


def _drain(queue: asyncio.Queue[Any], first: Any) -> list[Any]:
    items = [first]
    while not queue.empty():
        items.append(queue.get_nowait())
    return items


async def serve(address: str, batched: bool) -> None:
    async def process(requests: AsyncIterator[bytes], context: Any) -> None:
        events: asyncio.Queue[runner_pb2.Event] = asyncio.Queue()
        running: set[asyncio.Future[None]] = set()

        async def handle(delivery: runner_pb2.Delivery) -> None:
            result = runner_pb2.Result()
            result.payload.CopyFrom(delivery.message.payload)
            events.put_nowait(runner_pb2.Event(delivery_id=delivery.id, result=result))

        async def read_requests() -> None:
            async for raw in requests:
                for data in unframe(raw) if batched else [raw]:
                    task = asyncio.ensure_future(handle(runner_pb2.Delivery.FromString(data)))
                    running.add(task)
                    task.add_done_callback(running.discard)

        reader = asyncio.ensure_future(read_requests())
        try:
            while True:
                first = await events.get()
                if batched:
                    items = _drain(events, first)
                    await context.write(frame([e.SerializeToString() for e in items]))
                else:
                    await context.write(first.SerializeToString())
        finally:
            reader.cancel()

    server = grpc.aio.server()
    handler = grpc.stream_stream_rpc_method_handler(process)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Echo", {"Process": handler}),)
    )
    server.add_insecure_port(address)
    await server.start()
    await server.wait_for_termination()


async def client(address: str, batched: bool, count: int, window: int) -> tuple[float, float]:
    """(calls per second, client CPU microseconds per call)."""
    channel = grpc.aio.insecure_channel(address)
    queue: asyncio.Queue[runner_pb2.Delivery] = asyncio.Queue()
    waiting: dict[int, asyncio.Future[None]] = {}

    async def requests() -> AsyncIterator[bytes]:
        while True:
            first = await queue.get()
            if batched:
                yield frame([d.SerializeToString() for d in _drain(queue, first)])
            else:
                yield first.SerializeToString()

    stream = channel.stream_stream(METHOD)(requests())

    async def responses() -> None:
        async for raw in stream:
            for data in unframe(raw) if batched else [raw]:
                waiting.pop(runner_pb2.Event.FromString(data).delivery_id).set_result(None)

    reader = asyncio.ensure_future(responses())
    slots = asyncio.Semaphore(window)
    loop = asyncio.get_running_loop()
    payload = BytesValue(value=os.urandom(100))

    async def call(i: int) -> None:
        delivery = runner_pb2.Delivery(id=i)
        delivery.message.tracking_id = f"t{i}"
        delivery.message.payload.Pack(payload)
        done = waiting[i] = loop.create_future()
        queue.put_nowait(delivery)
        await done
        slots.release()

    cpu0, t0 = time.process_time(), time.perf_counter()
    tasks = []
    for i in range(1, count + 1):
        await slots.acquire()
        tasks.append(asyncio.ensure_future(call(i)))
    await asyncio.gather(*tasks)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    reader.cancel()
    await channel.close()
    return count / seconds, cpu / count * 1e6


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def measure(mode: str, count: int, window: int, folder: Path) -> str:
    socket = folder / f"{mode}.sock"
    address = f"unix://{socket}"
    cmd = [sys.executable, "-m", "bench.grpc_batching", "--serve", mode, "--address", address]
    server = subprocess.Popen(cmd)
    try:
        wait_until(socket.exists, 20, "the experiment's server listens", server)
        time.sleep(0.3)
        before = read(server.pid)
        rate, client_us = _run(client(address, mode == "batched", count, window))
        after = read(server.pid)
    finally:
        stop_process(server)
    server_us = (after.cpu_s - before.cpu_s) / count * 1e6 if before and after else float("nan")
    return (
        f"{mode:>8}: {rate:7.0f} calls/s, CPU per call: client {client_us:4.0f} us, "
        f"server {server_us:4.0f} us"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--serve", choices=["single", "batched"], help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        _run(serve(args.address, args.serve == "batched"))
        return
    print(f"{args.n} calls, {args.window} in flight, one stream over a Unix socket")
    with tempfile.TemporaryDirectory(prefix="kre-grpc-") as folder:
        for mode in ("single", "batched"):
            print(measure(mode, args.n, args.window, Path(folder)), flush=True)


if __name__ == "__main__":
    main()
