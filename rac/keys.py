"""`rac keys add|list|remove`: the API keys file a server reads (RAC_API_KEYS; service/auth.py).

rac keys add shop-a --scope classify --memories a --file keys.json   # prints the new key, once, on its last line
rac keys list --file keys.json
rac keys remove shop-a --file keys.json                               # the server stops taking it, no restart
"""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_keys(a: argparse.Namespace) -> None:
    from service.auth import add_key, read_keys, remove_key

    if a.op == "add":
        memories = [m.strip() for m in a.memories.split(",") if m.strip()] if a.memories else None
        key = add_key(a.file, a.name, a.scope, memories)
        reach = f"memories {', '.join(memories)}" if memories else "every memory"
        print(f"key {a.name!r} (scope {a.scope}, {reach}) added to {a.file}; it is shown this once:")
        print(key)
    elif a.op == "remove":
        remove_key(a.file, a.name)
        print(f"key {a.name!r} removed from {a.file}")
    else:
        for k in read_keys(a.file):
            reach = ",".join(k.memories) if k.memories is not None else "*"
            print(f"{k.name:<24} {k.scope:<9} memories {reach:<24} created {k.created}")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="API keys: add, list, remove (the file RAC_API_KEYS names)")
    ops = keys.add_subparsers(dest="op", required=True)
    ad = ops.add_parser("add", help="a new random key; stores only its SHA-256")
    ad.add_argument("name", help="what the key is called (in /metrics and logs; never the key itself)")
    ad.add_argument("--scope", choices=["classify", "admin"], required=True)
    ad.add_argument("--memories", help="the named memories it reaches, comma-separated (default: every one)")
    ad.add_argument("--file", type=Path, required=True)
    rm = ops.add_parser("remove", help="take a key away (a server reading the file stops taking it)")
    rm.add_argument("name")
    rm.add_argument("--file", type=Path, required=True)
    ls = ops.add_parser("list", help="the keys' names, scopes and memories")
    ls.add_argument("--file", type=Path, required=True)
    keys.set_defaults(func=cmd_keys)
