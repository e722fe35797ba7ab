"""The ``nibble`` command. Each module here that defines ``register(subparsers)`` adds one subcommand."""
