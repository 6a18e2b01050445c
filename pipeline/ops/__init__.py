"""Operator tools: traffic simulation, config and stack checks, traces, test callbacks."""
