"""`pdserve <command>`: each command lives in its own module with add_arguments() and run()."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

# command -> (module, one-line help)
COMMANDS = {
    "generate": ("pdserve.cli.generate", "generate text for prompts with the local engine"),
    "chat": ("pdserve.cli.generate", "chat with the model in the terminal"),
    "serve": ("pdserve.server.cli", "serve one worker (role prefill, decode or both) with the OpenAI API"),
    "sim": ("pdserve.sim.cli_sim", "simulate a P/D cluster on a request trace (LLMServingSim configs)"),
    "profile": ("pdserve.profile.cli", "measure the engine's step time over a grid -> PROFILE.json"),
    "plan": ("pdserve.sim.planner", "search prefill:decode counts and tp_size for the best goodput"),
    "router": ("pdserve.router.cli", "OpenAI endpoint in front of prefill and decode workers"),
    "up": ("pdserve.launch.cluster", "start prefill + decode workers and the router on this machine"),
    "scale": ("pdserve.ray_cluster.cli", "change the worker counts of a `pdserve up --ray` deployment"),
    "bench": ("pdserve.bench.cli", "benchmark a serving endpoint (TTFT, ITL, goodput); compare deployments"),
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default, unless the help already names it or there is
    none to show (None, False of a switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if "default" in text or d is None or d is False or d is argparse.SUPPRESS or d == []:
            return text
        return super()._get_help_string(action)
# long-running commands: their start-up lines (addresses, placement) are what a user looks for
SERVICES = {"serve", "router", "up"}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """All commands are listed; only `command`'s module is imported to add its flags, so
    e.g. `pdserve router` never pays for importing torch."""
    parser = argparse.ArgumentParser(prog="pdserve", description="LLM serving with prefill/decode disaggregation",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--log-level", default=None,
                        help="DEBUG | INFO | WARNING | ERROR (default: INFO for the long-running "
                             f"{', '.join(sorted(SERVICES))}, else WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_, formatter_class=HelpFormatter)
        if name == command:
            importlib.import_module(module).add_arguments(p, name)
    return parser


def _command_in(argv: list[str]) -> str | None:
    return next((a for a in argv if a in COMMANDS), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from pdserve import cpu_threads
    cpu_threads.prepare_env(cpu_threads.threads_in_argv(argv))   # before a command's module imports torch
    args = build_parser(_command_in(argv)).parse_args(argv)
    level = args.log_level or ("INFO" if args.command in SERVICES else "WARNING")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return module.run(args) or 0
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError) as e:
        print(f"pdserve {args.command}: error: {e}", file=sys.stderr)
        return 2

