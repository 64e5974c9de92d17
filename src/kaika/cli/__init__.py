"""The command line: :func:`main` is the ``kaika`` command (the table is in :mod:`kaika.cli.main`).

The only package that knows argparse: options are made from the config dataclasses
(:mod:`kaika.cli.options`), and each subcommand calls one library function.
"""

from kaika.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
