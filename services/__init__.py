"""The distributed service: one package per service, shared code in `services.common`."""
