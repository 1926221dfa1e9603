"""gRPC plumbing shared by the three services: server start-up, health, error mapping."""
