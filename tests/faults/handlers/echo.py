"""Fault-injection handler: StringValue in, "echo <text>" out.

FAULTS_DELAY (seconds, default 0) is slept on the event loop per message, so a load
lasts long enough for a fault to hit it mid-way. "hang:<text>" never returns (until
KRT_HANDLER_TIMEOUT cancels it). "retry:<n>:<text>" raises RetryableError on its first
n calls for a tracking id, then answers.
"""

import asyncio
import os
from collections import Counter

from google.protobuf.wrappers_pb2 import StringValue

from handler_host import RetryableError

DELAY = float(os.environ.get("FAULTS_DELAY", "0"))
CALLS: Counter[str] = Counter()


async def handler(ctx, data):
    req = StringValue()
    data.Unpack(req)
    if req.value.startswith("hang:"):
        await asyncio.Event().wait()
    if req.value.startswith("retry:"):
        CALLS[ctx.tracking_id] += 1
        if CALLS[ctx.tracking_id] <= int(req.value.split(":")[1]):
            raise RetryableError(f"not yet ({CALLS[ctx.tracking_id]})")
    if DELAY:
        await asyncio.sleep(DELAY)
    return StringValue(value=f"echo {req.value}")
