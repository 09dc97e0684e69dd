"""The datasets' files, their SHA-256 and public URLs; find a verified copy or download one.

Every file is pinned by its SHA-256 (the values of ``shared/data/SHA256SUMS``), so a mirror
over plain HTTP is as good as the original: what does not match is never used.

The download URL of a file is, in order of precedence:

1. ``base_url`` passed to :func:`ensure_file`: ``<base_url>/<filename>`` (a per-dataset base);
2. ``$MEPROP_MIRROR``: ``<mirror>/<dataset>/<filename>``, a mirror of a whole data root laid
   out like ``shared/data`` (``http://``, ``https://`` or ``file://``);
3. the registry: the file's own URL, or the dataset's ``base_url`` + ``/<filename>``.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..progress import bars
from .paths import ENV_VAR, DataError, cache_dir, data_roots

__all__ = [
    "DATASETS",
    "MIRROR_ENV_VAR",
    "ChecksumError",
    "DataNotFoundError",
    "Dataset",
    "DownloadError",
    "RemoteFile",
    "ensure_file",
    "file_url",
    "sha256_file",
]

#: Environment variable naming a mirror of a whole data root (see the module docstring).
MIRROR_ENV_VAR = "MEPROP_MIRROR"

_CHUNK = 1 << 20  # 1 MiB: reads for hashing and downloading
_TIMEOUT_S = 60.0  # per socket operation, not for the whole download


class ChecksumError(DataError):
    """A file's SHA-256 is not the registered one."""

    def __init__(self, message: str, path: str, expected: str, actual: str):
        super().__init__(message)
        self.path = path
        self.expected = expected
        self.actual = actual


class DataNotFoundError(DataError, FileNotFoundError):
    """No data root holds the file, and downloading was not allowed."""


class DownloadError(DataError):
    """The download failed (HTTP error, network error, short read, unwritable folder)."""


@dataclass(frozen=True)
class RemoteFile:
    """One published file: its SHA-256, size in bytes (if known) and own URL (if not the
    dataset's base URL + file name)."""

    sha256: str
    size: int | None = None
    url: str | None = None


@dataclass(frozen=True)
class Dataset:
    """A dataset: its folder name under a data root, its download base URL and its files."""

    name: str
    base_url: str
    files: Mapping[str, RemoteFile] = field(default_factory=dict)
    license: str = ""


_UD_EWT_BASE = "https://raw.githubusercontent.com/UniversalDependencies/UD_English-EWT/r2.16"
_FASHION_COMMIT = "b2617bb6d3ffa2e429640350f613e3291e10b141"

#: The registry, keyed by the dataset's folder name. Values from shared/data/SHA256SUMS.
DATASETS: dict[str, Dataset] = {
    "mnist": Dataset(
        name="mnist",
        base_url="https://ossci-datasets.s3.amazonaws.com/mnist",
        license="CC BY-SA 3.0 (Yann LeCun and Corinna Cortes)",
        files={
            "train-images-idx3-ubyte.gz": RemoteFile(
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609", 9912422
            ),
            "train-labels-idx1-ubyte.gz": RemoteFile(
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c", 28881
            ),
            "t10k-images-idx3-ubyte.gz": RemoteFile(
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6", 1648877
            ),
            "t10k-labels-idx1-ubyte.gz": RemoteFile(
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6", 4542
            ),
        },
    ),
    "fashion_mnist": Dataset(
        name="fashion_mnist",
        # Plain HTTP is the only endpoint of this bucket; the SHA-256 check covers integrity.
        base_url="http://fashion-mnist.s3-website.eu-central-1.amazonaws.com",
        license="MIT (Zalando SE)",
        files={
            "train-images-idx3-ubyte.gz": RemoteFile(
                "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84", 26421880
            ),
            "train-labels-idx1-ubyte.gz": RemoteFile(
                "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845", 29515
            ),
            "t10k-images-idx3-ubyte.gz": RemoteFile(
                "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073", 4422102
            ),
            "t10k-labels-idx1-ubyte.gz": RemoteFile(
                "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5", 5148
            ),
            # The bucket holds only the data; the licence comes from the repository.
            "LICENSE": RemoteFile(
                "13ef4788476d292858fa60eb9a5f74aeca5c65770bc885ccaa05823a17ef7be1",
                1109,
                "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/"
                f"{_FASHION_COMMIT}/LICENSE",
            ),
        },
    ),
    "ud_english_ewt": Dataset(
        name="ud_english_ewt",
        base_url=_UD_EWT_BASE,
        license="CC BY-SA 4.0",
        files={
            "en_ewt-ud-train.conllu": RemoteFile(
                "3fb78e2b55482c8ee00caa653af436c88c9e5bc9a73ce26e4ae3ddc79d2b7e7b", 14203025
            ),
            "en_ewt-ud-dev.conllu": RemoteFile(
                "531a54ff90d6ab12201c5a50c3e78e6ddac4de69abc4bce5d275d3cd29efe2b6", 1805545
            ),
            "en_ewt-ud-test.conllu": RemoteFile(
                "e266e515a0a7547657ed3d90d9ba46487d6bd251f27ad4269d4e8a427c8555cd", 1804515
            ),
            "LICENSE.txt": RemoteFile(
                "b3d1b0f4c6ae151f7eb78738f46ebd5ee140f8a7f76501ba26af123140d35ae7", 20014
            ),
            "README.md": RemoteFile(
                "099677d6938869b4e855e6ec6548fc24ffeb5fce90e1cd985847f7049664f29e", 18569
            ),
        },
    ),
}

# SHA-256 of files already hashed in this process, keyed by the file's identity (path, device,
# inode, size, mtime): hashing the 26 MB Fashion-MNIST images on every load is wasteful, and
# any rewrite of the file changes the key.
_HASHES: dict[tuple[str, int, int, int, int], str] = {}
_HASHES_LOCK = threading.Lock()


def _file_key(path: Path) -> tuple[str, int, int, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The SHA-256 of a file (hex), remembered for this process while the file is unchanged."""
    path = Path(path)
    key = _file_key(path)
    with _HASHES_LOCK:
        known = _HASHES.get(key)
    if known is not None:
        return known
    digest = _hash_file(path)
    with _HASHES_LOCK:
        _HASHES[key] = digest
    return digest


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _lookup(dataset: str, filename: str) -> tuple[Dataset, RemoteFile]:
    ds = DATASETS.get(dataset)
    if ds is None:
        raise ValueError(
            f"unknown dataset {dataset!r}; known datasets: {', '.join(sorted(DATASETS))}"
        )
    remote = ds.files.get(filename)
    if remote is None:
        raise ValueError(
            f"unknown file {filename!r} of dataset {dataset!r}; "
            f"registered files: {', '.join(sorted(ds.files))}"
        )
    return ds, remote


def file_url(dataset: str, filename: str, base_url: str | None = None) -> str:
    """The URL to download ``filename`` of ``dataset`` from (see the module docstring)."""
    ds, remote = _lookup(dataset, filename)
    if base_url:
        return f"{base_url.rstrip('/')}/{filename}"
    mirror = os.environ.get(MIRROR_ENV_VAR, "")
    if mirror:
        return f"{mirror.rstrip('/')}/{ds.name}/{filename}"
    return remote.url or f"{ds.base_url.rstrip('/')}/{filename}"


def _check(path: Path, remote: RemoteFile) -> str | None:
    """None if ``path`` holds the registered bytes, else the reason it does not."""
    if remote.size is not None:
        size = path.stat().st_size
        # A wrong size settles it without hashing.
        if size != remote.size:
            return f"size {size} bytes, expected {remote.size}"
    actual = sha256_file(path)
    if actual != remote.sha256:
        return f"checksum mismatch: expected sha256 {remote.sha256}, got {actual}"
    return None


def ensure_file(
    dataset: str,
    filename: str,
    root: str | os.PathLike[str] | None = None,
    download: bool = True,
    *,
    base_url: str | None = None,
    progress: bool = True,
) -> Path:
    """The path of a verified copy of ``filename`` of ``dataset``, downloading it if needed.

    The roots are searched in order (``root``, ``$MEPROP_DATA``, the user cache) for
    ``<root>/<dataset>/<filename>`` with the registered SHA-256; the first match is returned.
    Otherwise, if ``download``, the file is downloaded into the first root, replacing a corrupt
    copy there: to a temporary file in the same folder, checked, then renamed into place, so an
    interrupted or bad download never appears under the final name.

    Raises :class:`DataNotFoundError` (no copy, ``download=False``), :class:`ChecksumError` (a
    corrupt copy with ``download=False``, or a downloaded file that does not match) or
    :class:`DownloadError`.
    """
    ds, remote = _lookup(dataset, filename)
    roots = data_roots(root)
    looked: list[str] = []
    corrupt: tuple[Path, str] | None = None
    for r in roots:
        path = r / ds.name / filename
        if not path.is_file():
            looked.append(f"  {path}: {'a folder' if path.is_dir() else 'missing'}")
            continue
        problem = _check(path, remote)
        if problem is None:
            if corrupt is not None:  # say which copy is used, and that the first is bad
                _note(f"{corrupt[0]} is corrupt ({corrupt[1]}); using the good copy {path}")
            return path
        looked.append(f"  {path}: {problem}")
        if corrupt is None:
            corrupt = (path, problem)

    if not download:
        _refuse_missing(ds.name, filename, remote, roots, looked, corrupt)
    dest = roots[0] / ds.name / filename
    _check_dest(dest, filename)
    url = file_url(dataset, filename, base_url)
    if corrupt is not None:
        _note(f"{corrupt[0]} is corrupt ({corrupt[1]}); downloading a good copy to {dest}")
    try:
        _download(url, dest, remote, progress=progress)
    except DataError as e:
        if corrupt is not None:  # the first thing to know: the file there is corrupt
            path, problem = corrupt
            e.args = (
                f"{path} is corrupt ({problem}), and no good copy could be fetched: "
                f"{e.args[0]} Or replace {path} with the original file.",
                *e.args[1:],
            )
        raise
    return dest


def _check_dest(dest: Path, filename: str) -> None:
    if dest.is_dir():  # (a download could not replace it)
        raise DownloadError(
            f"{dest} is a folder, not the file {filename}: remove it (the file is then "
            "downloaded again), or put the original file in its place"
        )


def _refuse_missing(name: str, filename: str, remote: RemoteFile, roots: list[Path],
                    looked: list[str], corrupt: tuple[Path, str] | None) -> None:  # fmt: skip
    """The error for a file with no good copy where downloading is off: ``ChecksumError``
    naming the corrupt copy found first, else ``DataNotFoundError``; both say where they
    looked (``looked``) and the fixes."""
    where = "\n".join(looked)
    fix = (
        f"Fix: pass --data-dir (data_dir=) a folder holding {name}/{filename}, set "
        f"{ENV_VAR} to one, or allow downloading (download=True) into {roots[0]}."
    )
    if corrupt is not None:
        path, _problem = corrupt
        actual = sha256_file(path)
        raise ChecksumError(
            f"{path} is corrupt (expected sha256 {remote.sha256}, got {actual}); "
            f"no good copy of {name}/{filename} found. Looked in:\n{where}\n"
            f"{fix} Delete the corrupt file or replace it with the original.",
            str(path),
            remote.sha256,
            actual,
        )
    raise DataNotFoundError(
        f"{name}/{filename} not found and downloading is off. Looked in:\n{where}\n"
        f"(roots: --data-dir, then ${ENV_VAR}, then the cache {cache_dir()})\n{fix}"
    )


def _note(message: str) -> None:
    """A line on stderr about the data (a corrupt copy), which does not stop the run."""
    print(f"meprop: {message}", file=sys.stderr, flush=True)


def _download(url: str, dest: Path, remote: RemoteFile, *, progress: bool) -> None:
    """Fetch ``url`` into ``dest`` through a checked temporary file and an atomic rename."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as e:
        raise DownloadError(
            f"cannot write a download into {dest.parent}: {e}. Fix: pass --data-dir (data_dir=) "
            f"a writable folder, or set {ENV_VAR} to one."
        ) from e
    tmp = Path(tmp_name)
    try:
        actual, received = _fetch(url, fd, dest, remote, progress=progress)
        if actual != remote.sha256:
            raise ChecksumError(
                f"downloaded {dest.name} from {url} does not match: expected sha256 "
                f"{remote.sha256}, got {actual} ({received} bytes); it was discarded. Fix: try "
                f"again, or use another mirror ({MIRROR_ENV_VAR}).",
                str(dest),
                remote.sha256,
                actual,
            )
        # mkstemp creates the file private (0600); the data is public, let others read it.
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)  # atomic within one file system
        with _HASHES_LOCK:
            _HASHES[_file_key(dest)] = actual
    finally:
        # Whatever went wrong (including Ctrl-C), no partial file is left behind.
        tmp.unlink(missing_ok=True)


def _fetch(url: str, fd: int, dest: Path, remote: RemoteFile, *, progress: bool) -> tuple[str, int]:
    """Write ``url``'s body into the open file ``fd`` (closed on return), with a progress bar;
    returns its sha256 and its size. A failed or short download is a ``DownloadError``."""
    h = hashlib.sha256()
    received = 0
    request = urllib.request.Request(url, headers={"User-Agent": "meprop-data"})
    try:
        with (
            os.fdopen(fd, "wb") as out,
            urllib.request.urlopen(request, timeout=_TIMEOUT_S) as resp,
        ):
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else remote.size
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name,
                      disable=not bars(progress)) as bar:  # fmt: skip
                while chunk := resp.read(_CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
    except urllib.error.HTTPError as e:
        raise DownloadError(
            f"download of {url} failed: HTTP {e.code} {e.reason}. Fix: check the URL or "
            f"set {MIRROR_ENV_VAR} to a mirror, or put the original file at {dest} by hand."
        ) from e
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(
            f"download of {url} failed: {reason}. Fix: check the network, set "
            f"{MIRROR_ENV_VAR} to a mirror, or put the original file at {dest} by hand."
        ) from e
    if length and length.isdigit() and received != int(length):
        raise DownloadError(
            f"download of {url} was cut short: got {received} of {length} bytes. Fix: try again."
        )
    return h.hexdigest(), received
