"""Small data the tests make themselves: IDX files in the MNIST format."""

import gzip
import struct
from pathlib import Path

import torch


def idx_bytes(tensor: torch.Tensor) -> bytes:
    header = struct.pack(">HBB", 0, 0x08, tensor.dim()) + struct.pack(f">{tensor.dim()}I", *tensor.shape)
    return header + tensor.to(torch.uint8).contiguous().numpy().tobytes()


def write_fake_mnist(folder: Path, n_train: int = 40, n_test: int = 20, gz: bool = True, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = torch.randint(0, 256, (n, 28, 28), generator=g, dtype=torch.uint8)
        labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
        for kind, tensor, ndim in (("images", images, 3), ("labels", labels, 1)):
            raw = idx_bytes(tensor)
            name = f"{prefix}-{kind}-idx{ndim}-ubyte"
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(raw))
            else:
                (folder / name).write_bytes(raw)
        data[prefix] = (images, labels)
    return data


def one_line_error(result, code):
    """A CLI result that failed with ``code`` and said so in exactly one line ``error: ...``, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]
