"""Embedded examples: the digits demo that `secateurs demo` runs."""
