"""A handler that needs torch: the image for it derives from the handler-host image.

Built by examples/torch/Dockerfile (not part of `make test`: torch is large). It
answers the greeter's Request with the device its model runs on.
"""

import torch

# The greeter's generated module, copied beside this file by the Dockerfile.
from public_input_pb2 import Request, Response


def init(ctx):
    # Runs once, before the handler host reports SERVING: the model load goes here.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = torch.nn.Linear(4, 1).to(device).eval()
    ctx.set("device", device)
    ctx.set("model", model)
    ctx.logger.info("model loaded on %s", device)


def handler(ctx, data):
    # A sync handler: it runs in the KRT_HANDLER_THREADS pool (default 1), so the GPU
    # model is never entered twice at once.
    req = Request()
    data.Unpack(req)
    with torch.inference_mode():
        score = ctx.get("model")(torch.ones(1, 4, device=ctx.get("device"))).item()
    return Response(greeting=f"Hello, {req.name}! ({ctx.get('device')}, score {score:.3f})")
