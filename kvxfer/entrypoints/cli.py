"""The `kvxfer` command: dispatches subcommands to the modules that own them.

Each subcommand module exposes `add_arguments(parser)` and `main(args) -> int | None`. Only the
chosen subcommand's module is imported, so `kvxfer proxy` starts without loading torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand path -> (module, help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("make-model",): ("kvxfer.models.presets", "write a random-weight HF-format checkpoint"),
    ("serve",): ("kvxfer.entrypoints.serve", "run an OpenAI-compatible prefill/decode/both server"),
    ("proxy",): ("kvxfer.entrypoints.proxy", "run the P/D proxy in front of prefill and decode servers"),
    ("bench", "engine"): ("kvxfer.bench.engine", "engine throughput against HF generate"),
    ("bench", "transfer"): ("kvxfer.bench.transfer", "connector KV pull against a raw NIXL read"),
    ("bench", "serve"): ("kvxfer.bench.serve", "serving load generator: TTFT/TPOT/ITL, goodput, endpoint ratios"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser for `argv`: every subcommand listed, the arguments of the chosen one only."""
    chosen = next((path for path in COMMANDS if tuple(argv[: len(path)]) == path), None)
    parser = argparse.ArgumentParser(prog="kvxfer", description=__doc__.splitlines()[0])
    top = parser.add_subparsers(dest="command", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, (module, help_text) in COMMANDS.items():
        parent = top
        if len(path) == 2:
            if path[0] not in groups:
                group = top.add_parser(path[0], help=f"{path[0]} commands")
                groups[path[0]] = group.add_subparsers(dest="subcommand", required=True)
            parent = groups[path[0]]
        sub = parent.add_parser(path[-1], help=help_text)
        sub.set_defaults(_module=module)
        if path == chosen:
            importlib.import_module(module).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    result = importlib.import_module(args._module).main(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
