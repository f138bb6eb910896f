"""Occlusion-based bias audits of image classifiers.

The public entry points are re-exported here; everything else is internal.
"""
