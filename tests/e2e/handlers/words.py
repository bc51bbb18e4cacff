"""An end-to-end test handler that needs no generated code: StringValue in, StringValue out.

"fail:<text>" raises, "none:<text>" returns None, "slow:<text>" answers after 50 ms (a
load that lasts long enough to be interrupted).
"""

import asyncio

from google.protobuf.wrappers_pb2 import StringValue


def init(ctx):
    ctx.set("prefix", "echo")


async def handler(ctx, data):
    req = StringValue()
    data.Unpack(req)
    if req.value.startswith("fail:"):
        raise ValueError(f"refusing {req.value[5:]!r}")
    if req.value.startswith("none:"):
        return None
    if req.value.startswith("slow:"):
        await asyncio.sleep(0.05)
    return StringValue(value=f"{ctx.get('prefix')} {req.value}")
