"""Build the shipped WordNet supersense file from Debian's WordNet 3.0 (``apt-get install wordnet-base``).

Writes ``src/tenslora/data/wordnet_supersense.jsonl.gz`` (one noun or verb synset a line: ``text``, ``label``,
``pos``, ``offset``) and ``WORDNET_LICENSE`` beside it. The output is byte-for-byte reproducible: synsets are
sorted and the gzip header carries no time stamp.

    python scripts/build_wordnet_dataset.py [--wordnet-dir /usr/share/wordnet] [--out-dir src/tenslora/data]
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from tenslora.data.wordnet import DATA_FILE, LEXNAMES, SUPERSENSES

POS_FILES = {"n": "data.noun", "v": "data.verb"}
COPYRIGHT = Path("/usr/share/doc/wordnet-base/copyright")


def definition(gloss: str) -> str:
    """The gloss before its first quoted example, e.g. ``'draw air into the lungs; "breathe deeply"'``."""
    return gloss.split('"', 1)[0].rstrip(" ;:,")


def synsets(data_file: Path, pos: str) -> Iterator[dict[str, str]]:
    """One record per synset line of a WordNet ``data.*`` file (lines starting with spaces are the license)."""
    with data_file.open(encoding="utf-8") as lines:
        for line in lines:
            if line.startswith(" "):
                continue
            fields, gloss = line.split(" | ", 1)
            offset, lex_filenum, _ss_type, _w_cnt, lemma = fields.split(" ", 5)[:5]
            yield {"text": f"{lemma.replace('_', ' ')}: {definition(gloss.strip())}",
                   "label": LEXNAMES[int(lex_filenum)], "pos": pos, "offset": offset}


def license_text(copyright_file: Path) -> str:
    """The WordNet 3.0 license paragraph of a Debian copyright file, as plain text."""
    stanza = copyright_file.read_text(encoding="utf-8").split("License: WordNet3.0\n", 1)[1].split("\n\n", 1)[0]
    body = [line[1:] for line in stanza.splitlines()]
    return "\n".join("" if line == "." else line for line in body) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--copyright", type=Path, default=COPYRIGHT)
    parser.add_argument("--out-dir", type=Path, default=DATA_FILE.parent)
    args = parser.parse_args()

    records = [record for pos, name in POS_FILES.items() for record in synsets(args.wordnet_dir / name, pos)]
    if {record["label"] for record in records} != set(SUPERSENSES):
        raise SystemExit(f"{args.wordnet_dir} does not hold WordNet 3.0's noun and verb lexicographer files")
    records.sort(key=lambda record: (record["pos"], record["offset"]))
    out = args.out_dir / DATA_FILE.name
    with out.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as packed:
        for record in records:
            packed.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    (args.out_dir / "WORDNET_LICENSE").write_text(license_text(args.copyright), encoding="utf-8")
    print(f"{len(records)} synsets, {len(SUPERSENSES)} labels -> {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
