"""``steerserve dict``: list, show, import and remove dictionaries in the local store.

    steerserve dict list
    steerserve dict show NAME [--json]
    steerserve dict import PATH --format saelens|sparsify|dictionary_learning --name NAME [--model M] [--hook H]
    steerserve dict rm NAME
"""

from __future__ import annotations

import json
import sys


def _store():
    from dictionaries.store import DictionaryStore

    return DictionaryStore()


def _list(args) -> int:
    store = _store()
    names = store.names()
    if args.json:
        print(json.dumps([store.info(name)["config"] | {"name": name} for name in names], indent=2))
        return 0
    if not names:
        print(f"no dictionaries in {store.root}")
        return 0
    print(f"{'name':<28} {'arch':<9} {'hook':<26} {'d_in':>5} {'d_sae':>7}  model")
    for name in names:
        config = store.info(name)["config"]
        print(f"{name:<28} {config['architecture']:<9} {config['hook']:<26} {config['d_in']:>5} {config['d_sae']:>7}  "
              f"{config['model']['name']}")
    return 0


def _show(args) -> int:
    info = _store().info(args.name)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    config = info["config"]
    print(f"{info['name']}: {config['architecture']} dictionary, {config['d_sae']} features on {config['hook']} "
          f"(d_in {config['d_in']}{', k ' + str(config['k']) if config.get('k') else ''})")
    print(f"  model         {config['model']['name'] or '(unknown)'}  sha256 {config['model']['sha256'][:16] or '(unknown)'}")
    print(f"  dtype         {config['dtype']}, normalization {config['normalization']['kind']}")
    print(f"  weights       sha256 {config['weights_sha256'][:16]}")
    print(f"  provenance    {json.dumps(config['provenance'])}")
    print(f"  files         {', '.join(info['files'])}")
    for key, value in (info["metrics"] or {}).items():
        if isinstance(value, (int, float)):
            print(f"  {key:<13} {value:.6g}")
    return 0


def _import(args) -> int:
    from dictionaries.importers import import_dictionary

    store = _store()
    if args.name in store.names() and not args.force:
        print(f"error: a dictionary named {args.name!r} exists; pass --force to replace it", file=sys.stderr)
        return 2
    dictionary = import_dictionary(args.path, args.format, model=args.model, hook=args.hook)
    store.put(args.name, dictionary)
    config = dictionary.config
    print(f"imported {args.format} {config.architecture} dictionary as {args.name!r}: {config.d_sae} features, "
          f"d_in {config.d_in}, hook {config.hook}")
    return 0


def _remove(args) -> int:
    _store().delete(args.name)
    print(f"removed {args.name}")
    return 0


def add_commands(commands) -> None:
    from dictionaries.importers import FORMATS

    group = commands.add_parser("dict", help="manage dictionaries in the local store").add_subparsers(dest="action", required=True)
    listing = group.add_parser("list", help="dictionaries in the store")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=_list)
    show = group.add_parser("show", help="a dictionary's config, metrics and files")
    show.add_argument("name")
    show.add_argument("--json", action="store_true")
    show.set_defaults(handler=_show)
    imports = group.add_parser("import", help="import a dictionary trained by another library")
    imports.add_argument("path", help="the directory the other library wrote")
    imports.add_argument("--format", required=True, choices=FORMATS)
    imports.add_argument("--name", required=True, help="name in the store: [a-z0-9][a-z0-9._-]{0,63}")
    imports.add_argument("--model", help="model name to record (overrides the files')")
    imports.add_argument("--hook", help="hook point, e.g. blocks.2.hook_resid_post (overrides the files')")
    imports.add_argument("--force", action="store_true", help="replace a dictionary of the same name")
    imports.set_defaults(handler=_import)
    remove = group.add_parser("rm", help="remove a dictionary from the store")
    remove.add_argument("name")
    remove.set_defaults(handler=_remove)
