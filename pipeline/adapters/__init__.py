"""Adapters: the only modules that touch a library's private internals, one a library."""
