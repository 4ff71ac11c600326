"""The ``modelwatch`` command verbs: the entry point (``main``), ``run``, ``tail``
and ``alerts forward``; each verb imports what it needs only when it runs."""

from streams.cli.main import main

__all__ = ["main"]
