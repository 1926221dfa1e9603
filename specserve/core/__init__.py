"""Pure algorithms of speculative decoding: no gRPC, no Redis, no model loading.

Everything here works on plain Python lists and torch tensors, so it is tested
without servers and reused unchanged by the services and the in-process engine.
"""
