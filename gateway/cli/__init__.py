"""The ``gateway`` command: one module per command group, each with ``register()``."""
