"""Regenerate the checked-in Python code from the .proto sources.

python -m protos.generate          # write the generated files in place
python -m protos.generate --check  # exit 1 when a checked-in file is stale
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parent.parent

# (proto file relative to its include root, include root, with a gRPC service?)
SOURCES: list[tuple[str, Path, bool]] = [
    ("protos/kre_nats_msg.proto", ROOT, False),
    ("protos/runner.proto", ROOT, True),
    ("public_input.proto", ROOT / "examples" / "greeter", False),
]


def _generated_names(proto: str, grpc: bool) -> list[str]:
    stem = proto.removesuffix(".proto")
    names = [f"{stem}_pb2.py", f"{stem}_pb2.pyi"]
    if grpc:
        names.append(f"{stem}_pb2_grpc.py")
    return names


def generate(out_root: Path | None = None) -> list[tuple[Path, Path]]:
    """Generate every source; return (generated file, checked-in file) pairs."""
    pairs = []
    well_known = str(Path(protoc.__file__).parent / "_proto")
    for proto, include, grpc in SOURCES:
        out = include if out_root is None else out_root / include.relative_to(ROOT)
        out.mkdir(parents=True, exist_ok=True)
        args = [
            "protoc",
            f"-I{include}",
            f"-I{well_known}",
            f"--python_out={out}",
            f"--pyi_out={out}",
        ]
        if grpc:
            args.append(f"--grpc_python_out={out}")
        if protoc.main([*args, str(include / proto)]) != 0:
            raise SystemExit(f"protoc failed on {proto}")
        pairs += [(out / name, include / name) for name in _generated_names(proto, grpc)]
    return pairs


def stale_files() -> list[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        return [
            checked_in
            for fresh, checked_in in generate(Path(tmp))
            if not checked_in.exists() or not filecmp.cmp(fresh, checked_in, shallow=False)
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files")
    if parser.parse_args().check:
        stale = stale_files()
        for path in stale:
            print(f"stale: {path.relative_to(ROOT)} (run `make protos`)", file=sys.stderr)
        sys.exit(1 if stale else 0)
    generate()


if __name__ == "__main__":
    main()
