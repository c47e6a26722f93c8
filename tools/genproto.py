"""Generate Python gRPC stubs from protos/ into client/_pb (the only home of *_pb2*.py).

protoc names generated imports after the proto path (`from sluice.v1 import sluice_pb2`), which
would need `sluice` as a top-level package. We rewrite that one import to the package-qualified
`client._pb.sluice.v1` so the stubs live inside our distribution without touching sys.path.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path


def generate(root: Path) -> list[Path]:
    from grpc_tools import protoc  # build-time dependency only

    proto_root = root / "protos"
    out = root / "client" / "_pb"
    protos = sorted(proto_root.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = ["protoc", f"-I{proto_root}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
            f"--grpc_python_out={out}", *map(str, protos)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written = []
    for path in sorted(out.rglob("*_pb2*.py*")):
        text = path.read_text()
        fixed = re.sub(r"^from sluice\.(\S+) import", r"from client._pb.sluice.\1 import", text, flags=re.M)
        if fixed != text:
            path.write_text(fixed)
        written.append(path)
    for pkg in {p.parent for p in written} | {out / "sluice"}:
        (pkg / "__init__.py").touch()
    return written


if __name__ == "__main__":
    for p in generate(Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()):
        print(p)
