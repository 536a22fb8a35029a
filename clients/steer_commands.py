"""Find-and-steer commands: search by example, contrast, dictionary comparison, steering vectors.

    steerserve search "TEXT" --dictionary NAME --span START:END [--tokens] [--top-k N] [--rank-by activation]
    steerserve contrast --dictionary NAME --a "text" --a "text" ... --b-file FILE [--b-corpus builtin:pydocs/heldout]
                        [--unit text|token] [--direction both|a|b] [--save-vector NAME]
    steerserve compare A B [--threshold 0.7] [--limit 20] [--offset 0]
    steerserve vectors list | show NAME | put NAME --hook H --values FILE.json | rm NAME

All of them talk to a server over HTTP with the ``requests`` client (no torch).
"""

from __future__ import annotations

import json
import sys

from clients.serve_commands import _client


def _search(args) -> int:
    try:
        start, end = (int(part) for part in args.span.split(":"))
    except ValueError:
        print("error: --span takes START:END, e.g. 4:9", file=sys.stderr)
        return 2
    out = _client(args).search(args.text, args.dictionary, span=(start, end), unit="token" if args.tokens else "char",
                               top_k=args.top_k, rank_by=args.rank_by, model=args.model)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    first, last = out["span"]["tokens"]
    print(f"span {out['span']['text']!r} (tokens {first}..{last - 1}) in {out['dictionary']} ({out['hook']}), "
          f"ranked by {out['ranked_by']}" + (f" — {out['note']}" if out.get("note") else ""))
    for hit in out["features"]:
        relative = f"{hit['relative']:6.1%} of its max {hit['typical_max']:.2f}" if hit.get("relative") is not None else ""
        print(f"  feature {hit['feature']:>6}  {hit['activation']:7.3f} on {hit['token']!r:<14} {relative}")
    return 0


def _side(texts, path, corpus, name: str):
    if sum([bool(texts), bool(path), bool(corpus)]) != 1:
        print(f"error: give set {name} as --{name} TEXT (repeatable), --{name}-file FILE (one text a line) or "
              f"--{name}-corpus NAME", file=sys.stderr)
        return None
    if corpus:
        return corpus
    if path:
        with open(path, encoding="utf-8") as stream:
            return [line.rstrip("\n") for line in stream if line.strip()]
    return texts


def _contrast(args) -> int:
    a = _side(args.a, args.a_file, args.a_corpus, "a")
    b = _side(args.b, args.b_file, args.b_corpus, "b")
    if a is None or b is None:
        return 2
    out = _client(args).contrast(a, b, args.dictionary, unit=args.unit, top_k=args.top_k, direction=args.direction,
                                 save_vector=args.save_vector, model=args.model)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    sets = out["sets"]
    print(f"{out['dictionary']} ({out['hook']}): A {sets['a']['texts']} texts / {sets['a']['tokens']} tokens, "
          f"B {sets['b']['texts']} texts / {sets['b']['tokens']} tokens; one observation a {out['unit']}")
    print(f"  {'feature':>7} {'g':>8} {'se':>7} {'z':>7} {'mean A':>8} {'mean B':>8} {'active A':>9} {'active B':>9}")
    for f in out["features"]:
        print(f"  {f['feature']:>7} {f['effect_size']:>8.3f} {f['se']:>7.3f} {f['z']:>7.2f} {f['mean_a']:>8.3f} "
              f"{f['mean_b']:>8.3f} {f['active_fraction_a']:>9.0%} {f['active_fraction_b']:>9.0%}")
    if out.get("vector"):
        print(f"difference-of-means vector at {out['vector']['hook']}: norm {out['vector']['norm']:.3f}")
    if out.get("saved_vector"):
        print(f"saved as steering vector {out['saved_vector']['name']!r}; steer with --edit "
              f"vector:{out['saved_vector']['name']}:4")
    return 0


def _compare(args) -> int:
    out = _client(args).compare(args.a, args.b, threshold=args.threshold, offset=args.offset, limit=args.limit)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    a, b, mmcs = out["a"], out["b"], out["mmcs"]
    print(f"{a['name']} ({a['architecture']}, {a['d_sae']} features, {a['hook']})  vs  "
          f"{b['name']} ({b['architecture']}, {b['d_sae']} features, {b['hook']})")
    for warning in out["warnings"]:
        print(f"  warning: {warning}")
    print(f"  MMCS, decoder:  {a['name']} -> {b['name']} {mmcs['decoder']['a_to_b']:.4f}   "
          f"{b['name']} -> {a['name']} {mmcs['decoder']['b_to_a']:.4f}")
    print(f"  MMCS, encoder:  {a['name']} -> {b['name']} {mmcs['encoder']['a_to_b']:.4f}   "
          f"{b['name']} -> {a['name']} {mmcs['encoder']['b_to_a']:.4f}")
    print("  (X -> Y: mean over X's features of the best cosine with any feature of Y)")
    matching = out["matching"]
    if matching is None:
        print(f"  {out['note']}")
        return 0
    print(f"  one-to-one matching (Hungarian, decoder cosine): {matching['pairs']} pairs, mean decoder cosine "
          f"{matching['mean_decoder_cosine']:.4f}, mean encoder cosine {matching['mean_encoder_cosine']:.4f}")
    print(f"  {matching['above_threshold']} pairs at decoder cosine >= {matching['threshold']:g}; "
          f"showing {len(matching['data'])} from {matching['offset']}:")
    for pair in matching["data"]:
        print(f"    {pair['a']:>6} <-> {pair['b']:<6} decoder {pair['decoder_cosine']:.4f}  encoder {pair['encoder_cosine']:.4f}")
    return 0


def _vectors(args) -> int:
    client = _client(args)
    if args.action == "list":
        entries = client.vectors()
        if args.json:
            print(json.dumps(entries, indent=2))
        for entry in [] if args.json else entries:
            print(f"{entry['name']:<28} {entry.get('hook', ''):<26} norm {entry.get('norm', float('nan')):8.3f}"
                  + (f"  {entry['error']}" if "error" in entry else ""))
        return 0
    if args.action == "show":
        print(json.dumps(client.vector(args.name), indent=2))
        return 0
    if args.action == "put":
        with open(args.values, encoding="utf-8") as stream:
            values = json.load(stream)
        out = client.put_vector(args.name, values, args.hook, model=args.model, description=args.description)
        print(f"stored steering vector {out['name']!r} at {out['hook']} (norm {out['norm']:.3f})")
        return 0
    client.delete_vector(args.name)
    print(f"removed steering vector {args.name!r}")
    return 0


def add_commands(commands, common) -> None:
    search = commands.add_parser("search", help="the features most active on a span of a text (search by example)")
    search.add_argument("text")
    search.add_argument("--dictionary", required=True)
    search.add_argument("--span", required=True, help="START:END, characters (or tokens with --tokens)")
    search.add_argument("--tokens", action="store_true", help="the span counts tokens, not characters")
    search.add_argument("--top-k", type=int, default=10)
    search.add_argument("--rank-by", choices=("relative", "activation"), default="relative")
    common(search)
    search.set_defaults(handler=_search)

    contrast = commands.add_parser("contrast", help="features that separate two sets of texts, and their "
                                                    "difference-of-means steering vector")
    contrast.add_argument("--dictionary", required=True)
    for name in ("a", "b"):
        contrast.add_argument(f"--{name}", action="append", help=f"a text of set {name.upper()} (repeatable)")
        contrast.add_argument(f"--{name}-file", help=f"set {name.upper()}: one text a line")
        contrast.add_argument(f"--{name}-corpus", help=f"set {name.upper()}: a corpus the server exposes "
                                                       "(builtin:pydocs, builtin:pydocs/train, builtin:pydocs/heldout)")
    contrast.add_argument("--unit", choices=("text", "token"), default="text")
    contrast.add_argument("--direction", choices=("both", "a", "b"), default="both")
    contrast.add_argument("--top-k", type=int, default=20)
    contrast.add_argument("--save-vector", help="store the difference-of-means vector under this name (admin)")
    common(contrast)
    contrast.set_defaults(handler=_contrast)

    compare = commands.add_parser("compare", help="compare two dictionaries: MMCS both ways and a one-to-one matching")
    compare.add_argument("a")
    compare.add_argument("b")
    compare.add_argument("--threshold", type=float, default=0.5, help="list matched pairs at or above this cosine")
    compare.add_argument("--offset", type=int, default=0)
    compare.add_argument("--limit", type=int, default=10)
    common(compare)
    compare.set_defaults(handler=_compare)

    vectors = commands.add_parser("vectors", help="stored steering vectors").add_subparsers(dest="action", required=True)
    for action, text in (("list", "the stored steering vectors"), ("show", "one vector with its values"),
                         ("put", "store a vector from a JSON list of numbers (admin)"), ("rm", "remove one (admin)")):
        parser = vectors.add_parser(action, help=text)
        if action != "list":
            parser.add_argument("name")
        if action == "put":
            parser.add_argument("--hook", required=True, help="e.g. blocks.2.hook_resid_post")
            parser.add_argument("--values", required=True, help="a JSON file holding a list of d_model numbers")
            parser.add_argument("--description")
        common(parser)
        parser.set_defaults(handler=_vectors)
