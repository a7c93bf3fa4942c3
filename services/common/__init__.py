"""Shared by every service: config, the gRPC contract, tensors on the wire, errors, the Redis session store."""
