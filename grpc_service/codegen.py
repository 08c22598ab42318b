"""Regenerates grpc_service/generated/ from protos/ (needs grpcio-tools: `pip install -e ".[test]"`).

Run from a checkout: `python -m grpc_service.codegen`. The generated modules are committed;
tests/grpc_service/test_proto_generated.py fails when they are stale against the .proto.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO_ROOT / "protos"
PROTO_FILES = ("imageservice.proto", "drawthings.proto")
GENERATED_DIR = Path(__file__).resolve().parent / "generated"

# protoc writes `import x_pb2 as ...` as if the output folder were on sys.path; inside a
# package it must be a relative import.
_TOP_LEVEL_PB2_IMPORT = re.compile(r"^import (\w+_pb2) as ", re.MULTILINE)


def _protoc(*args: str) -> None:
    from grpc_tools import protoc  # deferred: a build/test dependency, not a runtime one

    include = str(Path(protoc.__file__).parent / "_proto")
    argv = ["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{include}", *args, *PROTO_FILES]
    if protoc.main(argv) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(argv)}")


def compile_descriptor_set(out_file: Path) -> None:
    """Compiles the .proto files into a serialized FileDescriptorSet at `out_file`."""
    _protoc(f"--descriptor_set_out={out_file}")


def generate() -> None:
    """Writes the *_pb2, *_pb2.pyi and *_pb2_grpc modules into GENERATED_DIR."""
    out = str(GENERATED_DIR)
    _protoc(f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}")
    for grpc_module in GENERATED_DIR.glob("*_pb2_grpc.py"):
        text = grpc_module.read_text()
        grpc_module.write_text(_TOP_LEVEL_PB2_IMPORT.sub(r"from . import \1 as ", text))


if __name__ == "__main__":
    generate()
    print(f"generated {', '.join(PROTO_FILES)} into {GENERATED_DIR}", file=sys.stderr)
