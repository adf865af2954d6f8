"""Datasets, their readers and Zarr layout, and patches."""
