"""Damaged files (second review D2, D3, D6, D7): a clear exit-1 error naming the file, never a
traceback and never an empty usage error."""

from __future__ import annotations

import errno
import gzip
import io
import os
import tempfile
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from crossent.cli.main import main
from crossent.io import DataError, open_predictions


def run(path, *args):
    return CliRunner().invoke(main, ["score", str(path), "--quiet", *args])


def _bad_data(result, path, *fragments):
    """Exit 1, one 'Error: <path>...' line naming every fragment, no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    assert result.stderr.startswith(f"Error: {path}"), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


@pytest.mark.parametrize("where", ["target", "score"])
@pytest.mark.parametrize("suffix", [".csv", ".csv.gz"])
def test_non_utf8_byte_is_the_same_row_error_compressed_or_not(tmp_path, where, suffix):
    """D2: in a .csv.gz it was exit 2 with an empty 'Error: ' (io.UnsupportedOperation)."""
    row = b"0.5,0.5,1\xe9\n" if where == "target" else b"0.5,0.5\xe9,1\n"
    data = b"p0,p1,y\n0.5,0.5,0\n" + row
    path = tmp_path / f"latin{suffix}"
    path.write_bytes(gzip.compress(data) if suffix == ".csv.gz" else data)
    result = run(path, "--target", "y", "--probs", "p0,p1")
    _bad_data(result, path, "data row 1: not UTF-8 text: byte 0xe9")


@pytest.fixture(scope="module")
def big_gzip(tmp_path_factory):
    """A .csv.gz whose decompressed text is far beyond the 4 MiB the header check reads."""
    rng = np.random.default_rng(5)
    n = 300_000
    p = rng.dirichlet(np.ones(2), n)[:, 0].tolist()
    y = rng.integers(0, 2, n).tolist()
    text = "p0,p1,y\n" + "".join(f"{a!r},{1 - a!r},{b}\n" for a, b in zip(p, y, strict=True))
    data = gzip.compress(text.encode(), compresslevel=1)
    assert len(text) > 2 * (1 << 22)
    return tmp_path_factory.mktemp("gz"), data


def test_truncated_gzip_late_in_the_stream(big_gzip):
    """D3: the codec's OSError past the first 4 MiB was a traceback."""
    folder, data = big_gzip
    path = folder / "trunc.csv.gz"
    path.write_bytes(data[: len(data) * 3 // 4])
    _bad_data(run(path, "--target", "y", "--probs", "p0,p1"), path, "cannot read the CSV file")


def test_corrupt_gzip_late_in_the_stream(big_gzip):
    """D3: a bad CRC-32 in the gzip trailer ('incorrect data check') was a traceback."""
    folder, data = big_gzip
    path = folder / "corrupt.csv.gz"
    damaged = bytearray(data)
    damaged[-8] ^= 0xFF  # the trailer's CRC-32 of the decompressed text
    path.write_bytes(bytes(damaged))
    _bad_data(run(path, "--target", "y", "--probs", "p0,p1"), path, "cannot read the CSV file")


class _Odd(ValueError):
    pass


@pytest.mark.parametrize(("error", "shown"), [
    (io.UnsupportedOperation(), "cannot read (UnsupportedOperation)"),  # also an OSError
    (_Odd(), "_Odd"),
    (UnicodeDecodeError("utf-8", b"\xe9", 0, 1, "invalid"), "not UTF-8 text"),
])
def test_a_value_error_while_reading_is_bad_data_never_an_empty_usage_error(
        tmp_path, monkeypatch, error, shown):
    """Usage errors (exit 2) come only from the options; a ValueError subclass raised while
    reading, even one without a message, is bad data (exit 1) with a message."""
    from crossent.io import _readers

    (tmp_path / "a.csv").write_text("p0,p1,y\n0.5,0.5,0\n")

    def broken(*args, **kwargs):
        raise error
        yield  # a generator, like the readers

    monkeypatch.setitem(_readers._READERS, "csv", broken)
    result = run(tmp_path / "a.csv", "--target", "y", "--probs", "p0,p1")
    _bad_data(result, tmp_path / "a.csv", shown)


def test_option_problems_are_still_usage_errors(tmp_path):
    (tmp_path / "a.csv").write_text("p0,p1,y\n0.5,0.5,0\n")
    result = run(tmp_path / "a.csv", "--target", "y", "--probs", "p0,p0")
    assert result.exit_code == 2 and "selects column 'p0' twice" in result.stderr


def _fortran_npz(path, compressed):
    rng = np.random.default_rng(2)
    p = np.asfortranarray(rng.dirichlet(np.ones(5), 20_011).astype(np.float32))
    y = rng.integers(0, 5, len(p))
    (np.savez_compressed if compressed else np.savez)(path, p=p, y=y)
    return p, y


def test_full_tmpdir_names_the_member_and_tmpdir(tmp_path, monkeypatch):
    """D6: a compressed column-major member is decompressed into a temporary file; a full
    TMPDIR (ENOSPC, or EFBIG under ulimit -f) was a traceback."""
    path = tmp_path / "fz.npz"
    _fortran_npz(path, compressed=True)
    real = tempfile.TemporaryFile

    class Full:
        def __init__(self):
            self.file = real()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.file, name)

    monkeypatch.setattr(tempfile, "TemporaryFile", Full)
    result = run(path, "--target", "y", "--probs", "p")
    _bad_data(result, path, "array 'p'", "temporary file", tempfile.gettempdir(), "TMPDIR",
              "No space left on device")
    with pytest.raises(DataError, match="array 'p'.*TMPDIR"):
        list(open_predictions(path, target="y", scores="p").batches(1000))


def _flip_inside(path, member, at_fraction):
    """Flip one bit inside ``member``'s data in the zip file."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(member)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), "<u2")
        at = info.header_offset + 30 + int(name_len) + int(extra_len)
        at += int(info.file_size * at_fraction)
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x10]))


@pytest.mark.parametrize("fortran", [True, False])
def test_corrupt_stored_member_fails_on_its_crc(tmp_path, fortran):
    """D7: the positioned reads of a stored column-major member skipped the CRC-32 (a flipped
    bit gave a silently different loss); a C-ordered one was a BadZipFile traceback."""
    path = tmp_path / "z.npz"
    rng = np.random.default_rng(4)
    z = rng.normal(size=(10_007, 6)).astype(np.float32)
    y = rng.integers(0, 6, len(z))
    np.savez(path, z=np.asfortranarray(z) if fortran else z, y=y)
    assert run(path, "--target", "y", "--logits", "z").exit_code == 0
    _flip_inside(path, "z.npy", 0.6)
    result = run(path, "--target", "y", "--logits", "z", "--batch-rows", "999")
    _bad_data(result, path, "array 'z'", "CRC-32", "corrupt")


def test_corrupt_compressed_member_is_a_data_error(tmp_path):
    path = tmp_path / "fz.npz"
    _fortran_npz(path, compressed=True)
    _flip_inside(path, "p.npy", 0.0)  # (file_size is the decompressed size: flip early)
    result = run(path, "--target", "y", "--probs", "p")
    _bad_data(result, path, "array 'p'", "corrupt")
