"""An end-to-end test handler that needs no generated code: StringValue in, StringValue out.

"fail:<text>" raises, "none:<text>" returns None, "sync" variants live in words_sync.py.
"""

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
    return StringValue(value=f"{ctx.get('prefix')} {req.value}")
