"""The embedded synthetic capture: a morphable head in FLAME's layout, rendered in NeRSemble's layout."""
