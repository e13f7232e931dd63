"""The `tessera` command: `serve`, `plugins`, `bench`, `--version` (each imports its work lazily)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from tessera.core.errors import TesseraError

Command = Callable[[list[str]], int]


def _serve(argv: list[str]) -> int:
    from tessera.api.args import check_supported, engine_config_from_args, parse_serve_args
    from tessera.core.plugins import load_plugins_from_env, set_plugins

    prog = "tessera serve"
    ns = parse_serve_args(argv, prog=prog)
    try:
        plugins = load_plugins_from_env(extra_modules=ns.plugin)
        set_plugins(plugins)
        check_supported(ns, plugins)
        engine_config_from_args(ns)  # validate every value before anything heavy starts
    except TesseraError as exc:
        return _fail(prog, exc.message)
    from tessera.api.server import run_server  # imports the engine (torch): only now

    result = run_server(ns)
    return result if isinstance(result, int) else 0


def _plugins(argv: list[str]) -> int:
    from tessera.core.plugins import load_plugins_from_env

    prog = "tessera plugins"
    parser = argparse.ArgumentParser(
        prog=prog,
        description="List every registered plugin entry (TESSERA_PLUGINS / TESSERA_DISABLE_PLUGINS apply).",
    )
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="Also load this plugin module.",
    )
    parser.add_argument("--json", action="store_true", help="Print JSON instead of a table.")
    ns = parser.parse_args(argv)
    try:
        plugin_set = load_plugins_from_env(extra_modules=ns.plugin)
    except TesseraError as exc:
        return _fail(prog, exc.message)
    plugin_modules = {plugin.name: plugin.module for plugin in plugin_set.plugins}
    rows = [
        {
            "kind": kind,
            "name": entry.name,
            "plugin": f"{entry.plugin} ({plugin_modules.get(entry.plugin, '?')})",
            "distribution": entry.distribution or "-",
            "version": entry.version or "-",
            "target": entry.target_path,
        }
        for kind, registry in plugin_set.registries.items()
        for entry in registry.entries()
    ]
    loaded = [
        {
            "plugin": plugin.name,
            "module": plugin.module,
            "distribution": plugin.distribution or "-",
            "version": plugin.version or "-",
        }
        for plugin in plugin_set.plugins
    ]
    if ns.json:
        print(json.dumps({"entries": rows, "plugins": loaded}, indent=2))
        return 0
    print(_table(rows, ["kind", "name", "plugin", "distribution", "version", "target"]))
    print()
    print("Loaded plugins:")
    print(_table(loaded, ["plugin", "module", "distribution", "version"]))
    return 0


def _bench(argv: list[str]) -> int:
    from tessera.api.bench import main as bench_main

    return bench_main(argv)


def _table(rows: list[dict[str, str]], columns: list[str]) -> str:
    widths = {col: max([len(col), *(len(row[col]) for row in rows)]) for col in columns}
    lines = ["  ".join(col.upper().ljust(widths[col]) for col in columns).rstrip()]
    lines += ["  ".join(row[col].ljust(widths[col]) for col in columns).rstrip() for row in rows]
    if not rows:
        lines.append("(none)")
    return "\n".join(lines)


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return 2


# name -> (one-line help, handler); a new subcommand is one more entry.
COMMANDS: dict[str, tuple[str, Command]] = {
    "serve": ("serve a model over an OpenAI-compatible HTTP API (all `vllm serve` flags)", _serve),
    "plugins": ("list the registered plugins and what each provides", _plugins),
    "bench": ("benchmark a server (serve) or the offline engine (throughput, latency)", _bench),
}


def _version() -> str:
    from tessera import __version__

    return f"tessera {__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tessera` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="tessera",
        description="tessera: an LLM inference engine and OpenAI-compatible server.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n"
        + "\n".join(f"  {name:<10} {text}" for name, (text, _) in COMMANDS.items())
        + "\n\nRun `tessera COMMAND --help` for a command's flags.",
    )
    parser.add_argument("--version", action="version", version=_version())
    parser.add_argument("command", choices=list(COMMANDS), metavar="COMMAND")
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    # Only the command name is parsed here; the command parses the rest, so its --help is its own.
    split = next((i for i, arg in enumerate(args) if not arg.startswith("-")), len(args))
    ns = parser.parse_args(args[: split + 1])
    return COMMANDS[ns.command][1](args[split + 1 :])


if __name__ == "__main__":
    sys.exit(main())
