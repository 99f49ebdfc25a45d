"""tinker-recovery: watches Tinker training runs and restores corrupted ones."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tinker-recovery")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0"
