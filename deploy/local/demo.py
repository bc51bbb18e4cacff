"""`make demo`: a two-node KRE workflow on real local servers, no Docker.

A real nats-server, nx-27017 (MongoDB protocol) and VictoriaMetrics (InfluxDB write
protocol); two nodes, each a sidecar and a handler host as real processes:
`greeter` (examples/greeter/handler.py) then `recorder` (examples/greeter/recorder.py,
which uses ctx.db, ctx.prediction and ctx.measurement). It sends a few requests as
KRE's entrypoint would, prints what came back on the entrypoint subject (the last
node's replies, and any node's error envelopes) and what landed in the stores, and
exits 0 when every request got its reply.
`--serve` keeps everything running until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from pathlib import Path

from pymongo import MongoClient

from deploy.local.client import Downstream, Upstream, connect, ensure_stream, request_envelope
from deploy.local.influx import InfluxServer
from deploy.local.mongo import MongoServer
from deploy.local.nats import NatsServer
from deploy.local.node import LocalNode, NodeConfig
from protos.kre_nats_msg_pb2 import KreNatsMessage

ROOT = Path(__file__).resolve().parents[2]
GREETER = ROOT / "examples" / "greeter"
sys.path.insert(0, str(GREETER))
from public_input_pb2 import Request, Response  # noqa: E402

STREAM = "kre-demo"
NAMES = ["Ada", "Grace", "Linus", "Margaret", ""]  # the empty name shows an error envelope


def workflow(nats_url: str, mongo_uri: str, influx_uri: str) -> list[NodeConfig]:
    stores = {"KRT_MONGO_URI": mongo_uri, "KRT_INFLUX_URI": influx_uri}
    common = {"nats_url": nats_url, "stream": STREAM, "base_path": GREETER, "extra": stores}
    return [
        NodeConfig(
            node_name="greeter",
            handler_path="handler.py",
            input_subject=f"{STREAM}.greeter",
            output_subject=f"{STREAM}.recorder",
            **common,
        ),  # type: ignore[arg-type]
        NodeConfig(
            node_name="recorder",
            handler_path="recorder.py",
            input_subject=f"{STREAM}.recorder",
            # The last node answers the entrypoint, where every node's errors go too.
            output_subject=f"{STREAM}.entrypoint",
            **{**common, "extra": {**stores, "KRT_IS_LAST_NODE": "true"}},
        ),  # type: ignore[arg-type]
    ]


def describe(envelope: KreNatsMessage | None) -> str:
    if envelope is None:
        return "NO REPLY"
    if envelope.error:
        return f"error   {envelope.error!r}"
    response = Response()
    envelope.payload.Unpack(response)
    path = " -> ".join(t.node_name for t in envelope.tracking)
    return f"reply   {response.greeting!r:24} tracking: {path}"


def show_stores(mongo: MongoServer, influx: InfluxServer, expected: int) -> None:
    with MongoClient(mongo.uri, serverSelectionTimeoutMS=5000) as client:
        db = client["data"]
        print(
            f"MongoDB: {db['greetings'].count_documents({})} documents in 'greetings', "
            f"{db['classificationMetrics'].count_documents({})} in 'classificationMetrics'"
        )
    series = influx.wait_for_series('{__name__="greetings_length"}', samples=expected)
    points = sum(len(s.values) for s in series)
    tags = sorted(
        {f"language={s.labels.get('language')},version={s.labels.get('version')}" for s in series}
    )
    print(f"InfluxDB: {points} points of measurement 'greetings' ({'; '.join(tags)})")


async def run(serve: bool) -> int:
    with NatsServer() as nats_server, MongoServer() as mongo, InfluxServer() as influx:
        nodes = workflow(nats_server.url, mongo.uri, influx.uri)
        nc, js = await connect(nats_server.url)
        await ensure_stream(js, STREAM, [s for n in nodes for s in n.subjects])
        print(f"nats-server {nats_server.url}, MongoDB {mongo.uri}, InfluxDB {influx.uri}")
        with contextlib.ExitStack() as stack:
            for config in nodes:
                node = stack.enter_context(LocalNode(config))
                print(
                    f"node {config.node_name!r} ready: {config.input_subject} -> "
                    f"{config.output_subject} (logs in {node.run_dir})"
                )
            downstream = await Downstream(js, STREAM, nodes[-1].entrypoint_subject).start()
            requests = [request_envelope(Request(name=name)) for name in NAMES]
            await Upstream(js, nodes[0].input_subject).send_all(requests)
            print(f"sent {len(requests)} requests to {nodes[0].input_subject}")
            by_id = {m.tracking_id: m for m in await downstream.wait_for(len(requests), 30)}
            for name, request in zip(NAMES, requests, strict=True):
                print(f"  {name!r:12} {describe(by_id.get(request.tracking_id))}")
            show_stores(mongo, influx, expected=sum(1 for n in NAMES if n))
            if serve:
                await serve_until_interrupted(nodes[0], nodes[-1])
        await nc.close()
    missing = len(requests) - len(by_id)
    print("all requests answered" if missing == 0 else f"{missing} requests got no reply")
    return 0 if missing == 0 else 1


async def serve_until_interrupted(first: NodeConfig, last: NodeConfig) -> None:
    print(
        f"serving: publish KRE envelopes to {first.input_subject!r} on {first.nats_url}; "
        f"replies and errors on {last.entrypoint_subject!r}. Ctrl-C stops."
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
