"""The ``radsynth`` console script: one subcommand per stage, the same ``key=value`` overrides everywhere.

With ``--json`` the last line printed to stdout is one JSON object (paths written, counts, figures) for
scripts and schedulers. User errors print one line to stderr and exit with code 2; Prefect is imported only
by the subcommands that run a flow.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from radsynth.configs import RadsynthConfig, UserInputError, config_to_yaml, load_config

USER_ERROR_EXIT = 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return USER_ERROR_EXIT
    try:
        config = load_config(args.config, args.overrides)
        result = args.run(config, args)
    except UserInputError as error:
        print(f"radsynth: error: {error}", file=sys.stderr)
        return USER_ERROR_EXIT
    if args.json:
        print(json.dumps(result, default=str))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radsynth", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    config = commands.add_parser("config", help="inspect configs").add_subparsers(title="config commands")
    _command(config, "show", _show_config, "print the resolved config (preset + overrides), validated")
    _command(commands, "ingest", _ingest, "read the data source, check, split by patient, preprocess, cache")
    _command(commands, "build", _build, "run the end-to-end build flow (Prefect)")
    return parser


def _command(commands, name: str, run: Callable, help_text: str) -> None:
    command = commands.add_parser(name, help=help_text, description=help_text)
    command.add_argument("config", metavar="CONFIG", help="a YAML file or a preset name (demo, cxr, ...)")
    command.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. runtime.seed=3 data.root=/data")
    command.add_argument("--json", action="store_true", help="end with one JSON object on stdout")
    command.set_defaults(run=run)


def _show_config(config: RadsynthConfig, args: argparse.Namespace) -> dict:
    if not args.json:
        print(config_to_yaml(config), end="")
    return config.model_dump(mode="json", by_alias=True)


def _ingest(config: RadsynthConfig, args: argparse.Namespace) -> dict:
    from radsynth.pipelines.data.ingest import ingest
    from radsynth.pipelines.data.summary import format_summary

    result = ingest(config, progress=not args.json)
    print(format_summary(result.summary))
    return {"command": "ingest", "preprocessed_now": result.preprocessed,
            "summary_path": str(result.summary_path), **result.summary}


def _build(config: RadsynthConfig, args: argparse.Namespace) -> dict:
    from radsynth.flows.settings import configure_prefect

    configure_prefect(config.output_dir)
    from radsynth.flows.build import build_flow

    return build_flow(config)


if __name__ == "__main__":
    sys.exit(main())
