"""FLAME-format head models: restricted loading, assets, and the torch forward model (``lbs``).

Importing this package is cheap; torch is imported by :mod:`facecanon_data.flame.lbs` only.
"""
from .assets import FlameAssets, FlameModel, LandmarkEmbedding, load_assets, load_flame_model  # noqa: F401
