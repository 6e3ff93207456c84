"""Config handling, distributed helpers, optimisation and logging."""
