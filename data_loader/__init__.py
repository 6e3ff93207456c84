"""Dataloaders (SPEC 5): transform recipes, WebDataset shards, image folders, bundled digits."""

from data_loader import digits, folder, transforms, webdata  # noqa: F401  (registers the config types)
from data_loader.base import LoaderRuntime

__all__ = ["LoaderRuntime"]
