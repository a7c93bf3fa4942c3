"""The gRPC wire contract: generated protos, tensors, errors and image validation. No Redis, Ray or torch:
the client and the bridge import only this floor."""
