"""Encoder, projection head, linear classifier, losses and the relaxed sorting network."""

from model import encoder, loss, projection  # noqa: F401  (registers the config types)
