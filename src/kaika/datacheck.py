"""``kaika data check`` and ``kaika data stats`` (in progress)."""

from __future__ import annotations

import argparse


def add_data_commands(p: argparse.ArgumentParser) -> None:
    p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
