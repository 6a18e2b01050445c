"""Postback attribution pipeline."""
