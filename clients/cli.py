"""The ``steerserve`` command.

    steerserve models build pythia-tiny
    steerserve models list
    steerserve dict list | show NAME [--json] | import PATH --format F --name NAME | rm NAME
    steerserve train --default | --hook H --arch relu|topk --d-sae N --l1 A,B --tokens N --name NAME
    steerserve eval --dictionary NAME [--edit DICT:FEATURE:OP[:VALUE]]... [--tokens N] [--json]
    steerserve serve [--config FILE] [--port N]
    steerserve generate "PROMPT" --edit DICT:FEATURE:OP[:VALUE] [--baseline] [--server URL]
    steerserve inspect "TEXT" --dictionary NAME | steerserve features NAME I
    steerserve preset put NAME --edit DICT:FEATURE:OP[:VALUE]... | list | show NAME | rm NAME
    steerserve search "TEXT" --dictionary NAME --span START:END | contrast --dictionary NAME --a T... --b T...
    steerserve compare A B | vectors list|show|put|rm

Commands import torch and the model code lazily, inside the handler that needs them, so
commands that only talk HTTP start fast and work without torch.
"""

from __future__ import annotations

import argparse
import json
import sys


def _models_build(args) -> int:
    from editing.home import models_dir
    from editing.model import BUILTIN_MODELS
    from editing.tiny import build_tiny_model

    if args.name not in BUILTIN_MODELS:
        print(f"error: only built-in models can be built ({', '.join(BUILTIN_MODELS)})", file=sys.stderr)
        return 2
    target = models_dir() / args.name
    if (target / "config.json").is_file() and not args.force:
        card = json.loads((target / "card.json").read_text())
        print(f"{args.name} is already built at {target} (held-out perplexity "
              f"{card['heldout']['perplexity']:.2f}); use --force to rebuild")
        return 0
    card = build_tiny_model(target, progress=True)
    print(f"built {args.name} at {target}")
    print(f"held-out cross-entropy {card['heldout']['cross_entropy']:.4f}, "
          f"perplexity {card['heldout']['perplexity']:.2f} on {card['heldout']['tokens']} tokens")
    return 0


def _models_list(args) -> int:
    from editing.model import list_models

    entries = list_models()
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    for entry in entries:
        ppl = entry.get("heldout_perplexity")
        extra = f"  held-out ppl {ppl:.2f}" if ppl else ""
        print(f"{entry['name']:<36} {entry['source']:<26} {entry['path'] or ''}{extra}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="steerserve", description="Steer GPT-NeoX models through dictionary features.")
    commands = parser.add_subparsers(dest="command", required=True)

    models = commands.add_parser("models", help="build and list models").add_subparsers(dest="action", required=True)
    build = models.add_parser("build", help="build a built-in model (pythia-tiny)")
    build.add_argument("name", help="the model to build, e.g. pythia-tiny")
    build.add_argument("--force", action="store_true", help="rebuild even if a build exists")
    build.set_defaults(handler=_models_build)
    listing = models.add_parser("list", help="models that are built or cached")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=_models_list)

    from clients import dict_commands, eval_commands, preset_commands, serve_commands, steer_commands, train_commands

    dict_commands.add_commands(commands)
    train_commands.add_commands(commands)
    eval_commands.add_commands(commands)
    serve_commands.add_commands(commands)
    preset_commands.add_commands(commands)
    steer_commands.add_commands(commands, serve_commands.common_options)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.handler(args)
        sys.stdout.flush()  # a reader that has gone shows up here, not as an error at exit
        return code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `steerserve features ... | head`: the reader has what it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to fail at exit's flush
        return 141  # as a process ended by SIGPIPE
    except Exception as err:  # a clean message, not a traceback, for the user's mistakes
        from clients.errors import is_user_error

        if not is_user_error(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
