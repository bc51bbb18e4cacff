"""The handler host: runs the user's KRE ``handler(ctx, data)`` behind a gRPC server.

For user code: raise ``RetryableError`` to have a message delivered again, and use
``Context`` (or ``MessageContext``) as the type hint of ``ctx``.
"""

from handler_host.context import Context, ContextPath, MessageContext
from handler_host.errors import RetryableError, RunnerError

__all__ = ["Context", "ContextPath", "MessageContext", "RetryableError", "RunnerError"]
