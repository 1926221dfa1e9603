"""Model runtime shared by the services: loading weights, KV sessions, the target's
verification worker and the draft's proposal worker. No gRPC here either."""
