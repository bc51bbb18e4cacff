"""The baseline: a bare nats-py loop, no handler, no gRPC, in its own process.

    python -m bench.baseline --url nats://127.0.0.1:4222 --stream S \\
        --input S.echo.in --output S.echo.out --count 5000

A durable pull consumer like the sidecar's (explicit ack), then `while` not done:
fetch up to 100, for each message copy its bytes and publish them through JetStream
with the same `Nats-Msg-Id` header the sidecar sets, await the batch's PubAcks
together, ack each message. With `--each-ack` it awaits each PubAck before the next
publish instead (issue 5's 3,500 msgs/s loop). It exits once `count` messages are
acked. It uses uvloop when installed, as the sidecar does. Only nats-py and the standard library are
imported, so its RSS is the loop's own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import nats
import nats.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

BATCH = 100


async def run(args: argparse.Namespace) -> int:
    nc = await nats.connect(args.url, name="bench-baseline")
    js = nc.jetstream()
    await js.add_consumer(
        args.stream,
        config=ConsumerConfig(
            durable_name=args.durable,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30,
            max_ack_pending=1000,
            filter_subject=args.input,
        ),
    )
    sub = await js.pull_subscribe_bind(durable=args.durable, stream=args.stream)
    bound_at = time.time()  # the clock starts here, as it does at the sidecar's /readyz
    deadline = time.monotonic() + args.timeout
    done = 0
    while done < args.count and time.monotonic() < deadline:
        try:
            msgs = await sub.fetch(BATCH, timeout=1.0)
        except nats.errors.TimeoutError:
            continue
        pub_acks = []
        for msg in msgs:
            data = bytes(memoryview(msg.data))  # the output: a copy of the input's bytes
            headers = {
                "Nats-Msg-Id": f"{args.stream}:{msg.metadata.sequence.stream}:{args.durable}"
            }
            if args.each_ack:
                await js.publish(args.output, data, headers=headers)
            else:
                pub_acks.append(await js.publish_async(args.output, data, headers=headers))
        await asyncio.gather(*pub_acks)
        for msg in msgs:
            await msg.ack()
        done += len(msgs)
    await nc.flush()
    await nc.close()
    print(json.dumps({"processed": done, "bound_at": bound_at}), flush=True)
    return 0 if done >= args.count else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--stream", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--durable", default="bare")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--each-ack", action="store_true", help="await each PubAck in turn")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:
        raise SystemExit(asyncio.run(run(args))) from None
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        raise SystemExit(runner.run(run(args)))


if __name__ == "__main__":
    main()
