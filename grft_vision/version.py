"""The library's version: one place, read by ``setup.cfg`` (``attr:``), the package and adapter files."""

__version__ = "0.1.0"
