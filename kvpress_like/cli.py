"""The ``kvpress-like`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from kvpress_like.catalog import format_catalog, list_parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvpress-like", description="KV-cache compression for transformers.")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="show every registered method and part with its options")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    demo = commands.add_parser("demo", help="needle-in-a-haystack demo on the embedded SmolLM2-135M")
    demo.add_argument("--model", default="smollm2-135m")
    demo.add_argument("--context-tokens", type=int, default=1500)
    demo.add_argument("--depth", type=float, default=0.5)
    demo.add_argument("--seed", type=int, default=3)
    args = parser.parse_args(argv)

    if args.command == "list":
        catalog = list_parts()
        print(json.dumps(catalog, indent=2, default=str) if args.json else format_catalog(catalog))
    elif args.command == "demo":
        from kvpress_like.demo import run_demo

        print(run_demo(args.model, args.context_tokens, args.depth, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
