"""Regenerates the Python stubs in specserve/v1 from protos/specserve/v1/*.proto.

Run `python -m specserve.protogen` (or `make protos`) after editing a .proto file;
a test fails when the committed stubs differ from what this produces.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"
PACKAGE = Path("specserve") / "v1"


def generate(out_dir: Path) -> list[Path]:
    """Writes the stubs under out_dir/specserve/v1 and returns their paths."""
    import grpc_tools
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in (PROTO_DIR / PACKAGE).glob("*.proto"))
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    args = ["protoc", f"-I{PROTO_DIR}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    return sorted((out_dir / PACKAGE).glob("*_pb2*.py*"))


def main() -> int:
    written = generate(ROOT)
    (ROOT / PACKAGE / "__init__.py").touch()
    print("\n".join(str(p.relative_to(ROOT)) for p in written))
    return 0


def stale_stubs() -> list[str]:
    """Names of committed stub files that differ from freshly generated ones."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = []
        for path in fresh:
            committed = ROOT / PACKAGE / path.name
            if not committed.is_file() or committed.read_bytes() != path.read_bytes():
                stale.append(path.name)
        return stale


if __name__ == "__main__":
    sys.exit(main())
