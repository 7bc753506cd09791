"""Generate the Python protobuf and gRPC code (with type stubs) from protos/mlops/v1.

One command, one output package: ``python protos/generate.py`` writes into
``services/shared/proto``. ``--check`` regenerates into a temporary directory and fails when
the committed code differs (stale or hand-edited).

protoc names generated modules after the proto package (``mlops.v1``); the imports between
them are rewritten so the code lives inside ``services.shared.proto`` instead of claiming a
top-level ``mlops`` package.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
OUT_PACKAGE = "services.shared.proto"
OUT_DIR = ROOT / "services" / "shared" / "proto"

# `from mlops.v1 import x_pb2`, `import mlops.v1.x_pb2` and, in stubs, `mlops.v1.x_pb2.Name`
_MODULE_REFERENCE = re.compile(r"(?<![\w.])mlops\.v1(?=\.\w+_pb2|\s+import\s)")


def _rewrite_imports(path: Path) -> None:
    path.write_text(_MODULE_REFERENCE.sub(f"{OUT_PACKAGE}.mlops.v1", path.read_text()))


def generate(out_dir: Path) -> None:
    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    if not protos:
        raise SystemExit("no .proto files under protos/")
    include = Path(protoc.__file__).parent / "_proto"
    bin_dir = Path(sys.executable).parent  # the plugins are installed beside the interpreter
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for package_dir in [out_dir, *(p for p in out_dir.rglob("*") if p.is_dir())]:
        (package_dir / "__init__.py").touch()
    (out_dir / "py.typed").touch()
    for generated in out_dir.rglob("*.py*"):
        if generated.suffix in {".py", ".pyi"} and generated.name != "__init__.py":
            _rewrite_imports(generated)


def _differences(left: Path, right: Path) -> list[str]:
    cmp = filecmp.dircmp(left, right, ignore=["__pycache__"])
    found = [f"only in committed: {n}" for n in cmp.left_only]
    found += [f"missing from committed: {n}" for n in cmp.right_only]
    found += [f"differs: {n}" for n in cmp.diff_files]
    for name, sub in cmp.subdirs.items():
        found += [f"{name}/{d}" for d in _differences(Path(sub.left), Path(sub.right))]
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if generated code is stale")
    args = parser.parse_args()
    if args.check:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = Path(tmp) / "proto"
            generate(fresh)
            diffs = _differences(OUT_DIR, fresh) if OUT_DIR.exists() else ["not generated"]
        if diffs:
            print("generated protobuf code is stale; run `make protos`:", *diffs, sep="\n  ")
            return 1
        print("generated protobuf code is up to date")
        return 0
    if OUT_DIR.exists():
        shutil.rmtree(OUT_DIR)
    generate(OUT_DIR)
    print(f"generated {OUT_PACKAGE} from {PROTO_ROOT.name}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
