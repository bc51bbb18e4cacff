"""Node A, run by the kre-py stand-in: the caller's name with its whitespace normalized."""

from greeter_messages import Request


async def handler(ctx, data):
    req = Request()
    data.Unpack(req)
    return Request(name=" ".join(req.name.split()))
