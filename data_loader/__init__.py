"""Dataloaders (`docs/reference.md §5`): recipes, WebDataset shards, image folders, bundled digits."""

from data_loader import digits, folder, transforms, webdata  # noqa: F401  (registers the config types)
from data_loader.base import Loader, LoaderRuntime

__all__ = ["Loader", "LoaderRuntime"]
