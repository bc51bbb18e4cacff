"""Node B, run by this runner (sidecar and handler host): the name upper-cased.

"fail-b" raises, so the workflow stops with an error; "exit-b" ends the workflow here
with ctx.early_exit(), answering the entrypoint directly.
"""

from greeter_messages import Request, Response


async def handler(ctx, data):
    req = Request()
    data.Unpack(req)
    if req.name == "fail-b":
        raise ValueError(f"refusing {req.name!r}")
    if req.name == "exit-b":
        ctx.early_exit()
        return Response(greeting=f"Goodbye early, {req.name}!")
    return Request(name=req.name.upper())
