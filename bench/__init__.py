"""The benchmark harness: `python -m bench` (or `make bench`).

A real nats-server, the sidecar and the handler host as subprocesses with a trivial
echo handler, KRE envelopes in and out, and a bare nats-py loop measured in the same run
as the baseline. See docs/performance.md for what is measured and how.
"""
