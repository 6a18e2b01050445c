"""Postback attribution pipeline."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("postback-pipeline")
except PackageNotFoundError:  # run from a checkout that was never installed
    __version__ = "0+unknown"
