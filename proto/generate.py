"""Regenerate (or check) the Python code for the wire contract.

The generated modules are committed, so installing gradwatch needs no code
generator. After editing ``proto/gradwatch/v1/*.proto`` run::

    python -m gradwatch.proto.generate

``--check`` regenerates into a temporary folder and fails if the committed
files differ (the test suite runs it). Output depends on the pinned
grpcio-tools version (see pyproject.toml).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
SOURCES = sorted((PROTO_ROOT / "gradwatch").rglob("*.proto"))
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc on every source; returns the generated files under out_dir.

    The sources live in ``gradwatch/v1`` (their protobuf package) but are
    imported as ``gradwatch.proto.v1``: protoc's virtual path mapping
    (``-Ivirtual=real``) makes the generated imports point there.
    """
    from grpc_tools import protoc  # dev dependency, imported on demand

    real = PROTO_ROOT / "gradwatch"
    virtual = [f"gradwatch/proto/{p.relative_to(real).as_posix()}" for p in SOURCES]
    args = [
        "protoc",
        f"-Igradwatch/proto={real}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *virtual,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    base = out_dir / "gradwatch" / "proto"
    return sorted(p for p in base.rglob("*") if p.name.endswith(GENERATED_SUFFIXES))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed code is stale")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "gradwatch" / "proto"
        stale = []
        for produced in generate(Path(tmp)):
            committed = PROTO_ROOT / produced.relative_to(base)
            if args.check:
                if not committed.exists() or not filecmp.cmp(produced, committed, shallow=False):
                    stale.append(str(committed.relative_to(PROTO_ROOT.parent)))
            else:
                committed.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(produced, committed)
                print(f"wrote {committed.relative_to(PROTO_ROOT.parent)}")
    if stale:
        print("stale generated code (run: python -m gradwatch.proto.generate):", *stale,
              sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
