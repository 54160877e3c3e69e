"""Peak memory of reading (and preprocessing) the files that amplify a small input into a large read.

Each case is written to a temporary folder, then read by a fresh process that reports how much its
peak resident memory grew during ``read_volume`` and, for volumes that read, during
``preprocess_volume`` as well. Prints one JSON object per case; docs/reliability.md records them.

    python benchmarks/read_memory.py [--size 128]
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import tempfile
import textwrap
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

PROBE = textwrap.dedent(
    """
    import json, sys, time
    import SimpleITK  # imported on the first NRRD read; its ~90 MiB are not the read's
    from hagan.errors import VolumeError
    from hagan.data.io import read_volume
    from hagan.data.preprocess import preprocess_volume

    def peak():  # this process's high-water mark; ru_maxrss would include the parent's, inherited at fork
        status = open("/proc/self/status").read()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024

    before, start = peak(), time.perf_counter()
    result = {}
    try:
        volume = read_volume(sys.argv[1])
        result["read"] = "x".join(str(n) for n in volume.array.shape)
        result["read_peak_mib"] = round(peak() - before)
        preprocess_volume(volume, "mri", int(sys.argv[2]))
        result["preprocess_peak_mib"] = round(peak() - before)
    except VolumeError as err:
        result["error"] = err.reason[:120]
        result["read_peak_mib"] = round(peak() - before)
    result["seconds"] = round(time.perf_counter() - start, 2)
    print(json.dumps(result))
    """
)


def gzip_of(prefix: bytes, zeros: int, tail: bytes = b"") -> bytes:
    """``prefix``, ``zeros`` zero bytes and ``tail``, gzip-compressed a chunk at a time."""
    packer = zlib.compressobj(9, wbits=31)
    chunk = b"\0" * (1 << 20)
    parts = [packer.compress(prefix)]
    parts += [packer.compress(chunk) for _ in range(zeros >> 20)]
    parts += [packer.compress(b"\0" * (zeros & ((1 << 20) - 1))), packer.compress(tail), packer.flush()]
    return b"".join(parts)


def nifti_header(shape: tuple[int, ...], dtype, offset: int) -> bytes:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_sform(np.eye(4), code=1)
    block = bytearray(header.binaryblock)
    struct.pack_into("<f", block, 108, float(offset))
    return bytes(block) + b"\0" * 4


def cases(folder: Path) -> dict[str, Path]:
    """The amplification cases of the hostile-input review, rebuilt."""
    made = {}
    offset = 400_000_000
    made["nii.gz, vox_offset 400 MB"] = folder / "offset.nii.gz"
    made["nii.gz, vox_offset 400 MB"].write_bytes(gzip_of(nifti_header((8, 8, 8), np.float32, offset), offset - 352 + 2048))
    # a 512^3 int16 head-sized ball in a mostly empty field of view: a legal, highly compressible file
    ball = np.zeros((512, 512, 512), np.int16)
    grid = np.ogrid[-256:256, -256:256, -256:256]
    ball[(grid[0] ** 2 + grid[1] ** 2 + grid[2] ** 2) < 40**2] = 1000
    made["nii.gz, 512^3 int16 declared"] = folder / "ball512.nii.gz"
    made["nii.gz, 512^3 int16 declared"].write_bytes(
        gzip_of(nifti_header(ball.shape, np.int16, 352), 0, ball.tobytes(order="F")))
    del ball, grid
    made["ascii NRRD, 700^3 declared"] = folder / "ascii.nrrd"
    made["ascii NRRD, 700^3 declared"].write_text(
        "NRRD0004\ntype: float\ndimension: 3\nsizes: 700 700 700\nendian: little\nencoding: ascii\n\n1 2 3\n")
    made["hex NRRD, 700^3 declared"] = folder / "hex.nrrd"
    made["hex NRRD, 700^3 declared"].write_text(
        "NRRD0004\ntype: float\ndimension: 3\nsizes: 700 700 700\nendian: little\nencoding: hex\n\n0000803f\n")
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="cube edge for the preprocessing step")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hagan-read-memory-") as tmp:
        for name, path in cases(Path(tmp)).items():
            out = subprocess.run([sys.executable, "-c", PROBE, str(path), str(args.size)], capture_output=True,
                                 text=True, check=True).stdout
            print(json.dumps({"case": name, "file_bytes": path.stat().st_size, **json.loads(out)}))


if __name__ == "__main__":
    main()
