"""``steerserve preset``: named steering presets on a server (stored edit lists any OpenAI
client selects as ``"model": "BASE+NAME"``).

    steerserve preset put NAME --edit DICT:FEATURE:OP[:VALUE][@positions]... [--model M] [--description TEXT]
    steerserve preset list | show NAME | rm NAME          [--server URL] [--api-key KEY]

``put`` and ``rm`` need an admin key. Uses the ``requests`` client alone (no torch).
"""

from __future__ import annotations

import json
import os


def _put(args) -> int:
    from clients.serve_commands import _client, _edit_dict

    out = _client(args).put_preset(args.name, [_edit_dict(e) for e in args.edit], model=args.model,
                                   description=args.description)
    print(f"stored preset {args.name!r} ({len(out['edits'])} edits); use it as \"model\": \"{out['id']}\"")
    return 0


def _list(args) -> int:
    from clients.serve_commands import _client

    presets = _client(args).presets()
    if args.json:
        print(json.dumps(presets, indent=2))
        return 0
    if not presets:
        print("no presets")
    for preset in presets:
        edits = ", ".join(_label(edit) for edit in preset["edits"])
        print(f"{preset['id']:<36} {edits}" + (f"  # {preset['description']}" if preset["description"] else ""))
    return 0


def _label(edit: dict) -> str:
    """One stored edit in the CLI's ``--edit`` form: feature or vector, value and unit, positions, condition."""
    unit = {"max_activation": ",unit=max", "residual_norm": ",unit=norm"}.get(edit.get("value_unit", "raw"), "")
    value = "" if edit.get("value") is None else f":{edit['value']:g}"
    positions = "" if edit.get("positions", "all") == "all" else f"@{edit['positions']}"
    when = edit.get("when")
    condition = "" if not when else (f",when={when['dictionary']}:{when['feature']}"
                                     + (f">{when['above']:g}" if when.get("above") is not None else f"<{when['below']:g}"))
    target = f"vector:{edit['vector']}" if edit["op"] == "vector" else f"{edit['dictionary']}:{edit['feature']}:{edit['op']}"
    return f"{target}{value}{positions}{unit}{condition}"


def _show(args) -> int:
    from clients.serve_commands import _client

    print(json.dumps(_client(args).preset(args.name), indent=2))
    return 0


def _remove(args) -> int:
    from clients.serve_commands import _client

    _client(args).delete_preset(args.name)
    print(f"deleted preset {args.name!r}")
    return 0


def add_commands(commands) -> None:
    from clients.serve_commands import DEFAULT_SERVER

    group = commands.add_parser("preset", help="named steering presets on a server (model BASE+NAME)")
    actions = group.add_subparsers(dest="action", required=True)

    def common(parser):
        parser.add_argument("--server", default=DEFAULT_SERVER, help=f"default {DEFAULT_SERVER} ($STEERSERVE_SERVER)")
        parser.add_argument("--timeout", type=float, default=120.0)
        parser.add_argument("--api-key", default=os.environ.get("STEERSERVE_API_KEY"), help="default $STEERSERVE_API_KEY")

    put = actions.add_parser("put", help="store or replace a preset (admin)")
    put.add_argument("name")
    put.add_argument("--edit", action="append", required=True, help="DICT:FEATURE:OP[:VALUE][@positions], repeatable")
    put.add_argument("--model", help="the served model it is for (default: the first)")
    put.add_argument("--description", default="")
    common(put)
    put.set_defaults(handler=_put)
    listing = actions.add_parser("list", help="every preset")
    listing.add_argument("--json", action="store_true")
    common(listing)
    listing.set_defaults(handler=_list)
    show = actions.add_parser("show", help="one preset as JSON")
    show.add_argument("name")
    common(show)
    show.set_defaults(handler=_show)
    remove = actions.add_parser("rm", help="delete a preset (admin)")
    remove.add_argument("name")
    common(remove)
    remove.set_defaults(handler=_remove)
