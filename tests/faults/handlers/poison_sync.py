"""A sync handler that ends its own process on "poison": os._exit cannot be caught.

Everything else is echoed ("echo <text>") after FAULTS_DELAY seconds.
"""

import os
import time

from google.protobuf.wrappers_pb2 import StringValue

DELAY = float(os.environ.get("FAULTS_DELAY", "0"))


def handler(ctx, data):
    req = StringValue()
    data.Unpack(req)
    if req.value == "poison":
        os._exit(1)
    if DELAY:
        time.sleep(DELAY)
    return StringValue(value=f"echo {req.value}")
