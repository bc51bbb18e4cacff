"""Constants of the sidecar <-> handler-host contract, defined once for both processes.

They sit beside `runner.proto` because both images ship `protos/`: the sidecar and the
handler host agree on them by construction.
"""

from __future__ import annotations

from protos import runner_pb2

# Where the handler host listens and the sidecar connects: a Unix socket on the emptyDir
# both containers mount.
DEFAULT_HANDLER_ADDRESS = "unix:///var/run/kre/handler.sock"

# The gRPC service, also the name its grpc.health.v1 status is reported under.
SERVICE_NAME = runner_pb2.DESCRIPTOR.services_by_name["HandlerHost"].full_name

# The most bytes one DeliveryBatch or EventBatch carries, unless a single item is bigger:
# large enough to carry tens of small messages under load, small enough that one batch
# never holds up the stream for long.
BATCH_BYTES = 1024 * 1024

# The default gRPC message limit, the same on both sides (KRT_GRPC_MAX_MESSAGE_BYTES).
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
