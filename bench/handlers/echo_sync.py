"""The benchmark's handler as a plain `def`: runs in the host's thread pool."""


def handler(ctx, data):
    return data
