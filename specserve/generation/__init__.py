"""One generation request, as the orchestrator and the in-process bench runner see it.

- requests: a Generate request validated into a `Job` within the server's `Limits`.

It builds on the core and the protobuf types and imports no gRPC.
"""
