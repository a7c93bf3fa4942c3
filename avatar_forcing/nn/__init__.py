"""The network: audio encoder, motion auto-encoder, dual motion encoder, flow transformer, its KV cache,
the whole model and its checkpoints."""
