"""The KRE runner README's example in its exact form: ``pickle.load(ctx.path(...))``.

KRT_BASE_PATH=examples/kre_compat KRT_HANDLER_PATH=handler.py

KRE's README hands ``ctx.path(...)`` straight to ``pickle.load``. Here ``ctx.path()``
returns a path string that can also be read like a binary file, so that line works
unchanged (new code should prefer ``with open(ctx.path(...), "rb") as f``). The
messages are ``google.protobuf.Struct``s, so the example needs no generated code:

    request  {"text": "the team scored a goal"}
    response {"category": "sports", "scores": {"sports": 2, "weather": 0, "tech": 0}}
"""

import pickle

from google.protobuf.struct_pb2 import Struct


# this function will be executed once when the runner is starting
def init(ctx):
    # load file and save in memory to be used within the handler
    ctx.set("categories", pickle.load(ctx.path("data/categories.pkl")))


# this function will be executed when a message is received
async def handler(ctx, data):
    categories = ctx.get("categories")

    # data is the received message from the queue
    req = Struct()
    data.Unpack(req)
    text = req["text"] if "text" in req else ""
    if not isinstance(text, str) or not text.strip():
        raise ValueError('the request needs a "text" string to classify')

    words = text.lower().split()
    scores = {name: sum(w in keywords for w in words) for name, keywords in categories.items()}
    best = max(scores, key=scores.__getitem__)

    res = Struct()
    res.update({"category": best if scores[best] else "unknown", "scores": scores})
    return res  # return a protobuf for the next node
