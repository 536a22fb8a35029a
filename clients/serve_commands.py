"""``steerserve serve`` and the commands that talk to a server over HTTP.

    steerserve serve [--config deploy/local.yaml] [--port 8000]
    steerserve generate "PROMPT" --edit DICT:FEATURE:OP[:VALUE] [--baseline] [--server URL]
        (--edit also takes vector:NAME:VALUE, and [@positions][,unit=max|norm][,when=DICT:FEATURE>T])
    steerserve inspect "TEXT" --dictionary NAME [--server URL]
    steerserve features NAME I [--server URL]
    steerserve push DIR --name NAME | deploy NAME | undeploy NAME [--server URL] [--api-key KEY]

Only ``serve`` imports torch; the others use the ``requests`` client alone.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap

DEFAULT_SERVER = os.environ.get("STEERSERVE_SERVER", "http://127.0.0.1:8000")


def _client(args):
    from clients.client import Client

    return Client(args.server, timeout=args.timeout, api_key=args.api_key)


def _edit_dict(text: str) -> dict:
    """``DICT:FEATURE:OP[:VALUE][@POSITIONS]`` as the wire's edit object (the engine's own parser;
    ``editing.edits`` needs pydantic only, not torch)."""
    from editing.edits import parse_edit

    return parse_edit(text).model_dump(exclude_none=True)


def _generate(args) -> int:
    out = _client(args).generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                 seed=args.seed, edits=[_edit_dict(e) for e in args.edit or []],
                                 include_baseline=args.baseline, model=args.model)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    steered = args.prompt + out["text"]
    if out.get("baseline") is not None:
        baseline = args.prompt + out["baseline"]["text"]
        width = 38
        left, right = textwrap.wrap(baseline, width) or [""], textwrap.wrap(steered, width) or [""]
        print(f"{'baseline':<{width}} | steered")
        print(f"{'-' * width}-+-{'-' * width}")
        for i in range(max(len(left), len(right))):
            print(f"{left[i] if i < len(left) else '':<{width}} | {right[i] if i < len(right) else ''}")
    else:
        print(steered)
    for report in out["edit_report"]:
        changed = "changed" if report["changed"] else "CHANGED NOTHING"
        print(f"\n{report['dictionary'] or 'steering vectors'} ({report['hook']}): {report['positions_edited']} "
              f"positions, mean |Δh| {report['mean_delta_norm']:.3f}, {changed}")
        for feature in report["features"]:
            before = "-" if feature["mean_before"] is None else f"{feature['mean_before']:.3f}"
            after = "-" if feature["mean_after"] is None else f"{feature['mean_after']:.3f}"
            print(f"  feature {feature['feature']:>6}  {', '.join(feature['ops'])}: mean {before} -> {after}")
            for condition in feature.get("conditions", []):
                print(f"    {condition['op']}: fired at {condition['fired_positions']} of "
                      f"{condition['eligible_positions']} positions")
        for vector in report.get("vectors", []):
            added = "-" if vector["mean_added_norm"] is None else f"{vector['mean_added_norm']:.3f}"
            eligible = f" of {vector['eligible_positions']}" if "eligible_positions" in vector else ""
            print(f"  {vector['op']}: added at {vector['positions']}{eligible} positions, mean |added| {added}")
    return 0


def _inspect(args) -> int:
    out = _client(args).inspect(args.text, args.dictionary, top_k=args.top_k, model=args.model)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for token in out["tokens"]:
        features = "  ".join(f"{f['feature']}:{f['activation']:.2f}" for f in token["features"])
        print(f"{token['position']:>4} {token['token']!r:<16} {features}")
    return 0


def _search_features(args) -> int:
    hits = _client(args).search_features(args.name, args.search, limit=args.limit)
    if args.json:
        print(json.dumps(hits, indent=2))
        return 0
    if not hits:
        print(f"no feature of {args.name} matches {args.search!r}")
    for hit in hits:
        promoted = " ".join(repr(t["token"]) for t in hit["promoted"][:5])
        snippet = (hit.get("snippet") or {}).get("text", "")
        print(f"{hit['feature']:>6}  score {hit['score']:.3f}  density {hit['density']:.4%}  promotes {promoted}")
        if snippet:
            print(f"        {snippet!r}")
    return 0


def _features(args) -> int:
    if args.search is not None:
        return _search_features(args)
    if args.index is None:
        print("steerserve features: give a feature INDEX, or --search WORDS", file=sys.stderr)
        return 2
    out = _client(args).feature(args.name, args.index)
    if args.json or out.get("top_contexts") is None:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{args.name} feature {args.index} ({out['hook']}): density {out['density']:.4%}, "
          f"mean activation {out['mean_activation']:.3f}")
    print("top contexts:")
    for context in out["top_contexts"]:
        marked = "".join(f"[{t['token']}]" if t["activation"] == context["max_activation"] else t["token"]
                         for t in context["tokens"])
        print(f"  {context['max_activation']:7.3f}  {marked!r}")
    lens = out["logit_lens"]
    print("promotes:  " + "  ".join(repr(t["token"]) for t in lens["promoted"]))
    print("suppresses: " + "  ".join(repr(t["token"]) for t in lens["suppressed"]))
    return 0


def _push(args) -> int:
    out = _client(args).push(args.directory, args.name)
    print(f"installed {args.name!r} in the server's store ({out['config']['architecture']}, "
          f"{out['config']['d_sae']} features on {out['config']['hook']}); deploy it with: steerserve deploy {args.name}")
    return 0


def _deploy(args) -> int:
    client = _client(args)
    out = client.deploy(args.name, args.model) if args.command == "deploy" else client.undeploy(args.name, args.model)
    state = "serving" if out["deployed"] else "no longer serving"
    print(f"{out['model']} is {state} {args.name!r} on {out['replicas']} replica(s)")
    return 0


def _serve(args) -> int:
    import signal

    from service.app import AppArgs, run
    from service.setup import default_app_args, ensure_defaults

    app_args, host, port = default_app_args(), "127.0.0.1", args.port
    if args.config:
        import yaml

        config = yaml.safe_load(open(args.config))
        http = config.get("http_options") or {}
        host, port = http.get("host", host), args.port or http.get("port", 8000)
        app_args = AppArgs.model_validate(config["applications"][0].get("args") or {})
    port = port or 8000
    from service.access import keys_from_environment

    has_keys = bool(app_args.api_keys if app_args.api_keys is not None else keys_from_environment())
    if not has_keys and host not in ("127.0.0.1", "localhost", "::1"):
        print(f"error: no API keys are configured, so steerserve binds to loopback only, not {host}; set "
              "STEERSERVE_API_KEYS (key:role[:rate],...) or STEERSERVE_API_KEYS_FILE, or api_keys in the config",
              file=sys.stderr)
        return 2
    ensure_defaults(app_args)
    url = run(app_args, host=host, port=port)
    dictionary = next((d for m in app_args.models for d in m.dictionaries), None)
    edit = f', "edits": [{{"dictionary": "{dictionary}", "feature": 7, "op": "set", "value": 6}}]' if dictionary else ""
    print(f"\nsteerserve is serving {', '.join(m.name for m in app_args.models)} at {url}\n")
    print(f"open {url}/ in a browser: playground, feature pages, inspector, dictionaries and jobs\n")
    print("try:\n  curl -s " + url + "/v1/generate -H 'Content-Type: application/json' \\\n"
          f"    -d '{{\"prompt\": \"Return the number of\", \"max_new_tokens\": 12, \"include_baseline\": true{edit}}}'\n")
    if not has_keys:
        print("no API keys are configured: the service is OPEN to anything on this machine (loopback only).")
    print("Ctrl-C stops it.")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    from ray import serve

    serve.shutdown()
    return 0


def common_options(parser) -> None:
    """The options of every command that talks to a server."""
    parser.add_argument("--server", default=DEFAULT_SERVER, help=f"default {DEFAULT_SERVER} ($STEERSERVE_SERVER)")
    parser.add_argument("--model", help="served model (default: the first)")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--api-key", default=os.environ.get("STEERSERVE_API_KEY"), help="default $STEERSERVE_API_KEY")
    parser.add_argument("--json", action="store_true")


def add_commands(commands) -> None:
    serve = commands.add_parser("serve", help="serve models over HTTP with Ray Serve (127.0.0.1:8000)")
    serve.add_argument("--config", help="a Ray Serve config file, e.g. deploy/local.yaml")
    serve.add_argument("--port", type=int, help="default 8000 (or the config's)")
    serve.set_defaults(handler=_serve)

    common = common_options

    generate = commands.add_parser("generate", help="steered generation through a server")
    generate.add_argument("prompt")
    generate.add_argument("--edit", action="append",
                          help="DICT:FEATURE:OP[:VALUE] or vector:NAME:VALUE, then [@positions][,unit=max|norm]"
                               "[,when=DICT:FEATURE>T|<T]; repeatable")
    generate.add_argument("--baseline", action="store_true", help="also generate without edits, side by side")
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--seed", type=int)
    common(generate)
    generate.set_defaults(handler=_generate)

    inspect = commands.add_parser("inspect", help="top dictionary features at each token of a text")
    inspect.add_argument("text")
    inspect.add_argument("--dictionary", required=True)
    inspect.add_argument("--top-k", type=int, default=5)
    common(inspect)
    inspect.set_defaults(handler=_inspect)

    push = commands.add_parser("push", help="upload a native dictionary directory to a server's store (admin)")
    push.add_argument("directory")
    push.add_argument("--name", required=True)
    common(push)
    push.set_defaults(handler=_push)
    for verb, text in (("deploy", "load a stored dictionary into every replica, no restart (admin)"),
                       ("undeploy", "unload a dictionary from every replica (admin)")):
        parser = commands.add_parser(verb, help=text)
        parser.add_argument("name")
        common(parser)
        parser.set_defaults(handler=_deploy)

    features = commands.add_parser("features", help="one feature: density, top contexts, logit lens; or search "
                                                    "features by words (--search)")
    features.add_argument("name")
    features.add_argument("index", type=int, nargs="?")
    features.add_argument("--search", metavar="WORDS", help="rank features by WORDS in their promoted tokens and "
                                                             "top contexts (GET /v1/dictionaries/NAME/features?q=)")
    features.add_argument("--limit", type=int, default=10, help="with --search: how many hits")
    common(features)
    features.set_defaults(handler=_features)
