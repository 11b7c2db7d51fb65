"""cogbatch: run CogVLM-family vision-language models over large image collections."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cogbatch")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
