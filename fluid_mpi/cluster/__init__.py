"""Cluster layer: the virtual cluster and the elastic launcher."""
