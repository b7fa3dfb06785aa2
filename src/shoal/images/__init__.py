"""Template images: recipes that fill a root tree, EROFS images of them, and their mounts.

``TemplateStore`` is the entry point (build, list, mount, remove); ``RECIPES`` the registry.
"""

from shoal.images.recipes import RECIPES, Recipe
from shoal.images.store import TemplateInfo, TemplateStore

__all__ = ["RECIPES", "Recipe", "TemplateInfo", "TemplateStore"]
