"""``python -m streams.dashboards build [--check]``: regenerate the committed files."""

from __future__ import annotations

import argparse
import sys

from streams.dashboards import OUT, stale, write


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streams.dashboards")
    parser.add_argument("command", choices=["build"])
    parser.add_argument("--check", action="store_true",
                        help="only report files that differ from the code (exit 1 if any)")
    args = parser.parse_args(argv)
    if args.check:
        differ = stale(OUT)
        for path in differ:
            print(f"{path}: differs from the code; run python -m streams.dashboards build",
                  file=sys.stderr)
        return 1 if differ else 0
    for path in write(OUT):
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
