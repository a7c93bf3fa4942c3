"""The gateway's routers: tenants and keys (admin), avatars and sessions (tenant API keys), health."""
