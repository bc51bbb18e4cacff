"""Node C, the last node, run by the kre-py stand-in: the greeting."""

from greeter_messages import Request, Response


async def handler(ctx, data):
    req = Request()
    data.Unpack(req)
    return Response(greeting=f"Hello, {req.name}!")
