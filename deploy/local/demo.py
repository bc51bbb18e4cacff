"""`make demo`: a real nats-server, the sidecar and the handler host with the greeter.

Creates the node's stream, sends a few requests as the previous KRE node would, prints
the envelopes the node wrote to its output subject, and exits 0 when every request got
its reply. `--serve` keeps everything running until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

from deploy.local.client import Downstream, Upstream, connect, ensure_stream, request_envelope
from deploy.local.nats import NatsServer
from deploy.local.node import LocalNode, NodeConfig
from protos.kre_nats_msg_pb2 import KreNatsMessage

ROOT = Path(__file__).resolve().parents[2]
GREETER = ROOT / "examples" / "greeter"
sys.path.insert(0, str(GREETER))
from public_input_pb2 import Request, Response  # noqa: E402

NAMES = ["Ada", "Grace", "Linus", "Margaret", ""]  # the empty name shows an error envelope


def describe(envelope: KreNatsMessage) -> str:
    path = " -> ".join(t.node_name for t in envelope.tracking)
    if envelope.error:
        return f"error   {envelope.error!r}"
    response = Response()
    envelope.payload.Unpack(response)
    return f"reply   {response.greeting!r:24} tracking: {path}"


async def run(serve: bool) -> int:
    with NatsServer() as nats_server:
        config = NodeConfig(
            nats_url=nats_server.url,
            stream="kre-demo",
            base_path=GREETER,
            handler_path="handler.py",
        )
        nc, js = await connect(nats_server.url)
        await ensure_stream(js, config.stream, config.subjects)
        print(f"nats-server {nats_server.url}, stream {config.stream!r}")
        with LocalNode(config) as node:
            print(f"sidecar and handler host ready (logs in {node.run_dir})")
            downstream = await Downstream(js, config.stream, config.output_subject).start()
            requests = [request_envelope(Request(name=name)) for name in NAMES]
            await Upstream(js, config.input_subject).send_all(requests)
            print(f"sent {len(requests)} requests to {config.input_subject}")
            replies = (await downstream.wait_for(len(requests), timeout=30)).copy()
            by_id = {m.tracking_id: m for m in replies}
            for name, request in zip(NAMES, requests, strict=True):
                reply = by_id.get(request.tracking_id)
                print(f"  {name!r:12} {describe(reply) if reply else 'NO REPLY'}")
            missing = len(requests) - len(by_id)
            if serve:
                await serve_until_interrupted(config)
        await nc.close()
    print("all requests answered" if missing == 0 else f"{missing} requests got no reply")
    return 0 if missing == 0 else 1


async def serve_until_interrupted(config: NodeConfig) -> None:
    print(
        f"serving: publish KRE envelopes to {config.input_subject!r} on "
        f"{config.nats_url}; replies on {config.output_subject!r}. Ctrl-C stops."
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", action="store_true", help="keep serving until Ctrl-C")
    sys.exit(asyncio.run(run(parser.parse_args().serve)))


if __name__ == "__main__":
    main()
