"""The sync twin of echo.py, run in the handler host's thread pool.

"hang:<seconds>:<text>" blocks its thread that long: a thread cannot be cancelled.
"""

import time

from google.protobuf.wrappers_pb2 import StringValue


def handler(ctx, data):
    req = StringValue()
    data.Unpack(req)
    if req.value.startswith("hang:"):
        time.sleep(float(req.value.split(":")[1]))
    return StringValue(value=f"echo {req.value}")
