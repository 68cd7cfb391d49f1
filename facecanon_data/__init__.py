"""facecanon-data: multi-view face captures -> depth and FLAME canonical maps for 4D face models.

Importing the package is cheap: heavy dependencies (torch, open3d, mediapipe, pycolmap) are imported
by the modules that use them, when they are used.
"""
__version__ = "0.1.0"
