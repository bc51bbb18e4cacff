"""The greeter: the KRE runner README's example, made correct.

KRT_BASE_PATH=examples/greeter KRT_HANDLER_PATH=handler.py
"""

import pickle

# The handler file's folder is on sys.path, so its generated protobuf module imports directly.
from public_input_pb2 import Request, Response


def init(ctx):
    # Runs once, before the handler host reports SERVING: load files here, not per message.
    with open(ctx.path("data/greetings.pkl"), "rb") as f:
        ctx.set("greetings", pickle.load(f))


async def handler(ctx, data):
    greetings = ctx.get("greetings")

    req = Request()
    data.Unpack(req)  # data is the input message's payload, a google.protobuf.Any
    if not req.name:
        raise ValueError("Request.name is empty: send the name to greet")

    ctx.logger.info("greeting one visitor")
    return Response(greeting=f"{greetings['en']}, {req.name}!")
