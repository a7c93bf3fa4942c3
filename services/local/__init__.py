"""One machine: the local launcher (Ray, Redis, the Serve app)."""
