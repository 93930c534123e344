"""Fetch a data set file once, check its MD5, and say clearly what to do when offline."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

__all__ = ["DatasetUnavailableError", "download", "md5sum"]


class DatasetUnavailableError(FileNotFoundError):
    """The data set files are missing and could not be downloaded."""


def md5sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: str | os.PathLike, md5: str | None, what: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` (atomically: a partial file never takes its name).

    Raises:
        DatasetUnavailableError: the download failed (no network, HTTP error) or the file's MD5
            differs from ``md5``; the message names the URL and where to put the file by hand.

    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(partial, "wb") as out:
            while block := response.read(1 << 20):
                out.write(block)
    except (urllib.error.URLError, OSError, ValueError) as err:
        partial.unlink(missing_ok=True)
        raise DatasetUnavailableError(
            f"{what} is not in {dest.parent} and downloading it from {url} failed ({err}). "
            f"On a machine without internet access, download that file elsewhere and copy it to {dest}."
        ) from err
    if md5 is not None and (got := md5sum(partial)) != md5:
        partial.unlink(missing_ok=True)
        raise DatasetUnavailableError(f"{url} downloaded with MD5 {got}, expected {md5}; try again later")
    partial.replace(dest)
    return dest
