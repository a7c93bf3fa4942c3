"""Applications: offline generation and the `avatar-forcing` command line."""
