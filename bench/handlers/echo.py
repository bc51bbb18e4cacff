"""The benchmark's handler: gives the payload back untouched (an Any is not re-packed)."""


async def handler(ctx, data):
    return data
