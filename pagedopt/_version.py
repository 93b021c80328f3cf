"""The one place pagedopt's version is written (pyproject.toml reads it at build time).

Example:
    >>> from pagedopt._version import __version__
    >>> __version__.count(".") >= 2
    True
"""

__version__ = "0.1.0"
