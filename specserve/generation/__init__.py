"""One generation request, as the orchestrator and the in-process bench runner see it.

- requests: a Generate request validated into a `Job` within the server's `Limits`;
- plan: the one place that turns a job into its target session, proposer, speculation
  policy and decoding loop (`plan`), given what serves it (`Serving`: remote replicas
  for the orchestrator, models in this process for the bench runner).

It builds on the core (proposers, controllers, decoding loops) and the protobuf types,
and imports no gRPC.
"""
