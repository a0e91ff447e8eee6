"""Build kvcal's offline corpora from redistributable text that ships with Python.

Sources (both under the PSF License 2.0, which permits redistribution with the notice kept):
- English prose: the reStructuredText sources of the CPython 3.11 documentation, as shipped in
  Debian's ``python3.11-doc`` package (``/usr/share/doc/python3.11/html/_sources``).
- Code: the top-level pure-Python modules of the CPython 3.11 standard library.

Documents are split by a hash of their path, so train / calib / eval are disjoint and the split
does not depend on file-system order.  Outputs (committed under ``artifacts/corpus``):
``train.jsonl.xz`` (reference-model training only), ``calib.jsonl`` and ``eval.jsonl``, each a
JSON line per document with ``text``, ``kind`` (prose|code) and ``source``; ``SHA256SUMS``.

Usage:
    apt-get download python3.11-doc && dpkg -x python3.11-doc_*.deb /tmp/pydoc
    python scripts/build_corpora.py --doc-root /tmp/pydoc/usr/share/doc/python3.11/html/_sources
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import sysconfig
from pathlib import Path

# Documents per split by hash bucket out of 100; eval and calib stay small so tests read them fast.
EVAL_BUCKETS = range(0, 4)
CALIB_BUCKETS = range(4, 8)
MAX_DOC_CHARS = 60_000  # long files are cut into pieces so no single document dominates a split


def bucket(name: str) -> int:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 100


def pieces(text: str) -> list[str]:
    out, start = [], 0
    while start < len(text):
        end = min(len(text), start + MAX_DOC_CHARS)
        if end < len(text):
            cut = text.rfind("\n\n", start + MAX_DOC_CHARS // 2, end)
            end = cut if cut > 0 else end
        out.append(text[start:end].strip("\n") + "\n")
        start = end
    return [p for p in out if len(p) > 200]


def collect(doc_root: Path, stdlib: Path) -> list[dict]:
    docs = []
    for path in sorted(doc_root.rglob("*.rst.txt")):
        rel = "python-docs/" + path.relative_to(doc_root).as_posix()
        for i, text in enumerate(pieces(path.read_text(encoding="utf-8"))):
            docs.append({"text": text, "kind": "prose", "source": f"{rel}#{i}"})
    for path in sorted(stdlib.glob("*.py")):
        rel = "cpython-stdlib/" + path.name
        for i, text in enumerate(pieces(path.read_text(encoding="utf-8"))):
            docs.append({"text": text, "kind": "code", "source": f"{rel}#{i}"})
    return docs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--doc-root", type=Path, required=True)
    ap.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "artifacts" / "corpus")
    args = ap.parse_args()

    docs = collect(args.doc_root, args.stdlib)
    splits: dict[str, list[dict]] = {"train": [], "calib": [], "eval": []}
    for d in docs:
        b = bucket(d["source"].split("#")[0])
        name = "eval" if b in EVAL_BUCKETS else "calib" if b in CALIB_BUCKETS else "train"
        splits[name].append(d)

    args.out.mkdir(parents=True, exist_ok=True)
    sums = []
    for name, rows in splits.items():
        payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        if name == "train":
            path = args.out / "train.jsonl.xz"
            path.write_bytes(lzma.compress(payload, preset=9 | lzma.PRESET_EXTREME))
        else:
            path = args.out / f"{name}.jsonl"
            path.write_bytes(payload)
        sums.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}")
        kinds = {k: sum(len(r["text"]) for r in rows if r["kind"] == k) for k in ("prose", "code")}
        print(f"{name:6s} docs={len(rows):5d} prose_chars={kinds['prose']:9d} code_chars={kinds['code']:9d} "
              f"file={path.name} bytes={path.stat().st_size}")
    (args.out / "SHA256SUMS").write_text("\n".join(sums) + "\n")


if __name__ == "__main__":
    main()
