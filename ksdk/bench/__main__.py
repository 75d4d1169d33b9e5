"""``python -m ksdk.bench <benchmark> ...``: each benchmark module adds its own subcommand."""

from __future__ import annotations

import argparse
import sys

from ksdk.bench import e2e, experts, serving


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ksdk.bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="BENCHMARK")
    experts.add_parser(commands)
    e2e.add_parser(commands)
    serving.add_parser(commands)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
