"""A sync, CPU-bound handler: it runs in the handler host's thread pool.

KRT_BASE_PATH=examples/cpu_sync KRT_HANDLER_PATH=handler.py

A plain ``def handler`` runs in a pool of KRT_HANDLER_THREADS threads (default 1), never
on the event loop, so the host keeps answering health checks and other messages while
it works. hashlib releases the GIL while it hashes, so with KRT_HANDLER_THREADS=4 four
messages really hash at once; pure-Python work would take turns on the GIL (use
processes inside the handler, or more replicas, for that).

    request  {"text": "secret", "rounds": 100000}
    response {"digest": "<hex>", "rounds": 100000, "thread": "kre-handler_0"}
"""

import hashlib
import threading

from google.protobuf.struct_pb2 import Struct

SALT = b"kre-cpu-sync"
MAX_ROUNDS = 5_000_000


def handler(ctx, data):
    req = Struct()
    data.Unpack(req)
    text = req["text"] if "text" in req else ""
    rounds = int(req["rounds"]) if "rounds" in req else 100_000
    if not isinstance(text, str) or not 1 <= rounds <= MAX_ROUNDS:
        raise ValueError(f'expected {{"text": str, "rounds": 1..{MAX_ROUNDS}}}')

    digest = hashlib.pbkdf2_hmac("sha256", text.encode(), SALT, rounds).hex()
    ctx.logger.info("hashed %d rounds", rounds)  # never log the payload itself

    res = Struct()
    res.update({"digest": digest, "rounds": rounds, "thread": threading.current_thread().name})
    return res
