"""The NATS side of the split KRE runner.

It pulls KRE envelopes from a JetStream durable consumer, hands each one to the
handler host over gRPC, publishes what the handler returned and only then
acknowledges the input. `sidecar.main` wires the pieces together.
"""
