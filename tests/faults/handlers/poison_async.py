"""An async handler that misbehaves on "poison", as FAULTS_POISON says.

block: time.sleep(FAULTS_BLOCK) on the event loop (no timeout can fire meanwhile);
sysexit: sys.exit(3); interrupt: raise KeyboardInterrupt. Everything else is echoed
("echo <text>") after FAULTS_DELAY seconds.
"""

import asyncio
import os
import sys
import time

from google.protobuf.wrappers_pb2 import StringValue

DELAY = float(os.environ.get("FAULTS_DELAY", "0"))
MODE = os.environ.get("FAULTS_POISON", "")
BLOCK = float(os.environ.get("FAULTS_BLOCK", "10"))


async def handler(ctx, data):
    req = StringValue()
    data.Unpack(req)
    if req.value == "poison":
        if MODE == "block":
            time.sleep(BLOCK)  # noqa: ASYNC251 - the fault under test
        elif MODE == "sysexit":
            sys.exit(3)
        elif MODE == "interrupt":
            raise KeyboardInterrupt
    if DELAY:
        await asyncio.sleep(DELAY)
    return StringValue(value=f"echo {req.value}")
