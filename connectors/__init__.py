"""Connectors: one module per kind of mail store. ``connectors.base`` holds the contract."""
