"""Nodes for the bundled text-to-image model (filled in by the embedded-model work)."""
BUNDLED_NODES: dict = {}
