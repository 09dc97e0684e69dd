"""The data layer: IDX reading, data roots, checked downloads, MNIST splits, CoNLL-U reading.

Everything runs on tiny fixtures in tests/data and a local HTTP server; the internet is never
touched. The real-data tests at the end run only where $MEPROP_DATA holds the shared data.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import re
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from meprop.experiments import data as mdata
from meprop.experiments.data import (
    DATASETS,
    ChecksumError,
    ConlluError,
    DataError,
    DataNotFoundError,
    Dataset,
    DownloadError,
    IdxError,
    RemoteFile,
    cache_dir,
    data_roots,
    ensure_file,
    file_url,
    load_mnist,
    load_ud_ewt,
    read_conllu,
    read_idx,
    resolve_data_root,
)
from meprop.experiments.data import download as download_mod
from meprop.experiments.data import mnist as mnist_mod

FIXTURES = Path(__file__).resolve().parent / "data"
IMAGES = np.array(
    [[[0, 255], [128, 1]], [[10, 20], [30, 40]], [[255, 254], [0, 3]]], dtype=np.uint8
)
LABELS = np.array([7, 0, 9], dtype=np.uint8)
# An address where nothing listens: a fixture registry that tries to download fails at once.
NOWHERE = "http://127.0.0.1:9"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[str]:
    """Temporary download files left in a folder (there must be none)."""
    return [p.name for p in folder.iterdir() if p.name.endswith(".part")] if folder.is_dir() else []


@pytest.fixture
def env(monkeypatch, tmp_path):
    """No $MEPROP_DATA, no mirror, no proxies; the user cache under tmp_path/xdg/meprop."""
    for var in ("MEPROP_DATA", "MEPROP_MIRROR", "http_proxy", "HTTP_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path


def register(monkeypatch, name: str, files: dict[str, bytes | Path]) -> None:
    """Replace dataset ``name`` in the registry by one pinning ``files`` (bytes or a path)."""
    remote = {}
    for filename, content in files.items():
        blob = content.read_bytes() if isinstance(content, Path) else content
        remote[filename] = RemoteFile(hashlib.sha256(blob).hexdigest(), len(blob))
    monkeypatch.setitem(DATASETS, name, Dataset(name, NOWHERE, remote))


# --- a local HTTP server --------------------------------------------------------------------


class _Handler(SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, *args):  # keep the test output clean
        pass

    def do_GET(self):
        self.requests.append(self.path)
        if self.path.startswith("/short/"):
            # Announce 1000 bytes, send 3, hang up: a download cut short.
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"abc")
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def server(tmp_path):
    """(served folder, base URL, request log) of an HTTP server on 127.0.0.1."""
    served = tmp_path / "served"
    served.mkdir()
    log: list[str] = []
    handler = functools.partial(
        type("Handler", (_Handler,), {"requests": log}), directory=str(served)
    )
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{httpd.server_address[1]}", log
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


# --- IDX ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["images-3x2x2.idx3", "images-3x2x2.idx3.gz"])
def test_read_idx_images(name):
    arr = read_idx(FIXTURES / name)
    assert arr.dtype == np.uint8 and arr.shape == (3, 2, 2)
    np.testing.assert_array_equal(arr, IMAGES)
    assert arr.flags.writeable


@pytest.mark.parametrize("name", ["labels-3.idx1", "labels-3.idx1.gz"])
def test_read_idx_labels(name):
    np.testing.assert_array_equal(read_idx(FIXTURES / name), LABELS)


def test_read_idx_detects_gzip_by_magic_not_name(tmp_path):
    # A raw file under a .gz name and a gzipped one under a plain name both read.
    shutil.copy(FIXTURES / "images-3x2x2.idx3", tmp_path / "raw.gz")
    shutil.copy(FIXTURES / "images-3x2x2.idx3.gz", tmp_path / "gzipped.idx3")
    np.testing.assert_array_equal(read_idx(tmp_path / "raw.gz"), IMAGES)
    np.testing.assert_array_equal(read_idx(tmp_path / "gzipped.idx3"), IMAGES)


@pytest.mark.parametrize(
    ("code", "dtype", "values"),
    [
        (0x09, ">i1", [-128, 0, 127]),
        (0x0B, ">i2", [-30000, 1, 30000]),
        (0x0C, ">i4", [-(2**31), 7, 2**31 - 1]),
        (0x0D, ">f4", [-1.5, 0.0, 3.25]),
        (0x0E, ">f8", [np.pi, -np.e, 1e300]),
    ],
)
def test_read_idx_other_types(tmp_path, code, dtype, values):
    arr = np.array(values, dtype=dtype).reshape(3, 1)
    path = tmp_path / "x.idx"
    path.write_bytes(bytes([0, 0, code, 2]) + np.array([3, 1], ">i4").tobytes() + arr.tobytes())
    out = read_idx(path)
    assert out.shape == (3, 1) and out.dtype.isnative and out.dtype == arr.dtype.newbyteorder("=")
    np.testing.assert_array_equal(out.ravel(), np.array(values, dtype=dtype))


def test_read_idx_wrong_magic(tmp_path):
    path = tmp_path / "bad.idx"
    path.write_bytes(b"\x01\x02\x08\x01" + (FIXTURES / "labels-3.idx1").read_bytes()[4:])
    with pytest.raises(IdxError, match=r"not an IDX file \(magic 0x01020801"):
        read_idx(path)
    path.write_bytes(b"\x00\x00\x0a\x01\x00\x00\x00\x01\x05")  # 0x0A is no IDX type
    with pytest.raises(IdxError, match=r"magic 0x00000A01.*unknown type code 0x0A"):
        read_idx(path)
    with pytest.raises(IdxError, match="not an IDX file"):
        read_idx(FIXTURES / "tiny.conllu")


def test_read_idx_truncated(tmp_path):
    raw = (FIXTURES / "images-3x2x2.idx3").read_bytes()
    path = tmp_path / "short.idx3"
    path.write_bytes(raw[:-1])
    with pytest.raises(IdxError, match="expected 12 bytes of data.*found 11"):
        read_idx(path)
    path.write_bytes(gzip.compress(raw[:-5]))  # the same, gzipped
    with pytest.raises(IdxError, match="expected 12 bytes of data.*found 7"):
        read_idx(path)
    path.write_bytes(raw[:10])  # inside the dimensions
    with pytest.raises(IdxError, match="truncated header"):
        read_idx(path)
    path.write_bytes((FIXTURES / "images-3x2x2.idx3.gz").read_bytes()[:-8])  # cut gzip stream
    with pytest.raises(IdxError, match="corrupt gzip stream"):
        read_idx(path)


def test_read_idx_trailing_bytes(tmp_path):
    raw = (FIXTURES / "labels-3.idx1").read_bytes()
    path = tmp_path / "long.idx1"
    path.write_bytes(raw + b"\x00\x01")
    with pytest.raises(IdxError, match="expected 3 bytes of data.*found 5: 2 trailing"):
        read_idx(path)


# --- data roots -----------------------------------------------------------------------------


def test_resolution_order(env, monkeypatch):
    explicit, from_env = env / "explicit", env / "from_env"
    explicit.mkdir()
    from_env.mkdir()
    cache = env / "xdg" / "meprop"
    monkeypatch.setenv("MEPROP_DATA", str(from_env))
    assert resolve_data_root(explicit) == explicit.resolve()
    assert resolve_data_root(str(explicit)) == explicit.resolve()
    assert data_roots(explicit) == [explicit.resolve(), from_env.resolve(), cache]
    assert resolve_data_root() == from_env.resolve()
    monkeypatch.delenv("MEPROP_DATA")
    assert resolve_data_root() == cache
    assert data_roots(explicit) == [explicit.resolve(), cache]
    # Without XDG_CACHE_HOME (or with a relative one, which the spec says to ignore): ~/.cache.
    monkeypatch.setenv("HOME", str(env / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
    assert cache_dir() == env / "home" / ".cache" / "meprop"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert resolve_data_root() == env / "home" / ".cache" / "meprop"


def test_bad_explicit_root(env):
    missing = env / "no-such-dir"
    with pytest.raises(DataError, match=f"{re.escape(str(missing))}.*does not exist.*--data-dir"):
        resolve_data_root(missing)
    a_file = env / "file.txt"
    a_file.write_text("x")
    with pytest.raises(DataError, match=f"{re.escape(str(a_file))}.*is not a directory"):
        resolve_data_root(a_file)


def test_bad_env_root(env, monkeypatch):
    monkeypatch.setenv("MEPROP_DATA", str(env / "typo"))
    with pytest.raises(DataError, match=r"\$MEPROP_DATA.*typo.*does not exist"):
        resolve_data_root()


# --- finding and checking files -------------------------------------------------------------


@pytest.fixture
def toy(env, monkeypatch):
    """A registered dataset 'toy' with one file, and its bytes."""
    content = b"toy data\n" * 100
    register(monkeypatch, "toy", {"toy.bin": content})
    return content


def put(root: Path, content: bytes, name: str = "toy.bin") -> Path:
    path = root / "toy" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_ensure_file_search_order(env, toy, monkeypatch):
    explicit, from_env = env / "explicit", env / "from_env"
    cached = put(env / "xdg" / "meprop", toy)
    explicit.mkdir()
    from_env.mkdir()
    monkeypatch.setenv("MEPROP_DATA", str(from_env))
    assert ensure_file("toy", "toy.bin", explicit, download=False) == cached.resolve()
    in_env = put(from_env, toy)
    assert ensure_file("toy", "toy.bin", explicit, download=False) == in_env.resolve()
    in_explicit = put(explicit, toy)
    assert ensure_file("toy", "toy.bin", explicit, download=False) == in_explicit.resolve()


def test_verification_is_cached_per_process(env, toy, monkeypatch):
    path = put(env / "xdg" / "meprop", toy)
    calls = []
    real = download_mod._hash_file
    monkeypatch.setattr(download_mod, "_hash_file", lambda p: calls.append(p) or real(p))
    for _ in range(3):
        assert ensure_file("toy", "toy.bin", download=False) == path
    assert len(calls) == 1
    # A rewritten file (same size, new bytes and mtime) is hashed again and found corrupt.
    path.write_bytes(b"X" + toy[1:])
    os.utime(path, ns=(1, 1))
    with pytest.raises(ChecksumError):
        ensure_file("toy", "toy.bin", download=False)
    assert len(calls) == 2


def test_corrupt_file_is_not_used(env, toy, monkeypatch, capsys):
    explicit = env / "explicit"
    bad = put(explicit, b"Toy data\n" + toy[9:])  # same size, one byte differs
    expected = hashlib.sha256(toy).hexdigest()
    got = sha256(bad)
    with pytest.raises(ChecksumError) as info:
        ensure_file("toy", "toy.bin", explicit, download=False)
    message = str(info.value)
    assert str(bad) in message and expected in message and got in message
    assert (info.value.expected, info.value.actual) == (expected, got)
    # A good copy further down the search order is used instead of the corrupt one, and
    # stderr says so.
    from_env = env / "from_env"
    good = put(from_env, toy)
    monkeypatch.setenv("MEPROP_DATA", str(from_env))
    capsys.readouterr()
    assert ensure_file("toy", "toy.bin", explicit, download=False) == good.resolve()
    err = capsys.readouterr().err
    assert err.startswith(f"meprop: {bad.resolve()} is corrupt (checksum mismatch")
    assert f"using the good copy {good.resolve()}" in err


def test_a_corrupt_file_is_named_first_when_no_good_copy_can_be_fetched(env, toy, capsys):
    bad = put(env / "root", b"Toy data\n" + toy[9:])
    with pytest.raises(DownloadError) as info:
        ensure_file("toy", "toy.bin", env / "root")  # the registry points at nowhere
    message = str(info.value)
    assert message.startswith(f"{bad.resolve()} is corrupt (checksum mismatch: expected sha256")
    assert "download of http://127.0.0.1:9/toy.bin failed" in message
    assert f"replace {bad.resolve()} with the original" in message
    assert f"{bad.resolve()} is corrupt" in capsys.readouterr().err


def test_missing_without_download_names_all_roots(env, toy, monkeypatch):
    explicit, from_env = env / "explicit", env / "from_env"
    explicit.mkdir()
    from_env.mkdir()
    monkeypatch.setenv("MEPROP_DATA", str(from_env))
    with pytest.raises(DataNotFoundError) as info:
        ensure_file("toy", "toy.bin", explicit, download=False)
    message = str(info.value)
    for root in (explicit.resolve(), from_env.resolve(), env / "xdg" / "meprop"):
        assert str(root / "toy" / "toy.bin") in message
    assert "--data-dir" in message and "MEPROP_DATA" in message and "download" in message
    assert isinstance(info.value, FileNotFoundError)


def test_unknown_dataset_or_file(env, toy):
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        ensure_file("nope", "toy.bin")
    with pytest.raises(ValueError, match="unknown file 'other.bin'.*toy.bin"):
        ensure_file("toy", "other.bin")


# --- downloads from a local server ----------------------------------------------------------


def test_download_success(env, toy, server):
    served, url, log = server
    (served / "toy.bin").write_bytes(toy)
    root = env / "root"
    root.mkdir()
    path = ensure_file("toy", "toy.bin", root, base_url=url)
    assert path == root.resolve() / "toy" / "toy.bin"
    assert path.read_bytes() == toy
    assert leftovers(path.parent) == []
    assert log == ["/toy.bin"]
    # Now present and verified: no second download.
    assert ensure_file("toy", "toy.bin", root, base_url=url) == path
    assert log == ["/toy.bin"]


def test_download_goes_to_cache_and_uses_mirror(env, toy, server, monkeypatch):
    served, url, log = server
    put(served, toy)  # a mirror is laid out like a data root: <mirror>/toy/toy.bin
    monkeypatch.setenv("MEPROP_MIRROR", url + "/")
    path = ensure_file("toy", "toy.bin", progress=False)
    assert path == env / "xdg" / "meprop" / "toy" / "toy.bin"
    assert path.read_bytes() == toy and log == ["/toy/toy.bin"]


def test_download_replaces_corrupt_file(env, toy, server):
    served, url, _ = server
    (served / "toy.bin").write_bytes(toy)
    bad = put(env / "root", b"junk")
    assert ensure_file("toy", "toy.bin", env / "root", base_url=url) == bad.resolve()
    assert bad.read_bytes() == toy


def test_download_checksum_mismatch(env, toy, server):
    served, url, _ = server
    (served / "toy.bin").write_bytes(toy.upper())  # same size, wrong bytes
    root = env / "root"
    root.mkdir()
    with pytest.raises(ChecksumError) as info:
        ensure_file("toy", "toy.bin", root, base_url=url)
    message = str(info.value)
    assert "toy.bin" in message
    assert hashlib.sha256(toy).hexdigest() in message
    assert hashlib.sha256(toy.upper()).hexdigest() in message
    assert not (root / "toy" / "toy.bin").exists()
    assert leftovers(root / "toy") == []


def test_download_404(env, toy, server):
    _, url, _ = server
    root = env / "root"
    root.mkdir()
    with pytest.raises(DownloadError, match=rf"{url}/toy.bin.*HTTP 404"):
        ensure_file("toy", "toy.bin", root, base_url=url)
    assert not (root / "toy" / "toy.bin").exists()
    assert leftovers(root / "toy") == []


def test_download_cut_short(env, toy, server):
    _, url, _ = server
    root = env / "root"
    root.mkdir()
    with pytest.raises(DownloadError, match="cut short: got 3 of 1000 bytes"):
        ensure_file("toy", "toy.bin", root, base_url=url + "/short")
    assert not (root / "toy" / "toy.bin").exists()
    assert leftovers(root / "toy") == []


def test_download_unreachable(env, toy):
    root = env / "root"
    root.mkdir()
    with pytest.raises(DownloadError, match="download of http://127.0.0.1:9/toy.bin failed"):
        ensure_file("toy", "toy.bin", root)  # the fixture registry points at NOWHERE
    assert not (root / "toy" / "toy.bin").exists()


def test_file_urls(env, monkeypatch):
    assert (
        file_url("mnist", "train-images-idx3-ubyte.gz")
        == "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz"
    )
    assert (
        file_url("fashion_mnist", "t10k-labels-idx1-ubyte.gz")
        == "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/t10k-labels-idx1-ubyte.gz"
    )
    assert file_url("ud_english_ewt", "en_ewt-ud-dev.conllu") == (
        "https://raw.githubusercontent.com/UniversalDependencies/UD_English-EWT/r2.16/"
        "en_ewt-ud-dev.conllu"
    )
    # base_url beats $MEPROP_MIRROR, which beats the registry.
    monkeypatch.setenv("MEPROP_MIRROR", "file:///srv/data")
    assert file_url("mnist", "t10k-labels-idx1-ubyte.gz") == (
        "file:///srv/data/mnist/t10k-labels-idx1-ubyte.gz"
    )
    assert file_url("mnist", "t10k-labels-idx1-ubyte.gz", "http://h/x/") == (
        "http://h/x/t10k-labels-idx1-ubyte.gz"
    )


def test_registry_matches_shared_sha256sums():
    root = os.environ.get("MEPROP_DATA", "")
    sums = Path(root) / "SHA256SUMS" if root else None
    if sums is None or not sums.is_file():
        pytest.skip("no SHA256SUMS under $MEPROP_DATA")
    listed = {}
    for line in sums.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name.lstrip("*")] = digest
    registered = {
        f"{ds.name}/{filename}": remote.sha256
        for ds in DATASETS.values()
        for filename, remote in ds.files.items()
    }
    assert registered == listed


# --- MNIST ----------------------------------------------------------------------------------


@pytest.fixture
def mnist_root(env, monkeypatch):
    """A data root with fixture 'MNIST' files: 3 training and 3 test images of 2x2.

    The test files are raw IDX under the .gz names: the loader must go by content.
    """
    folder = env / "fixture-root" / "mnist"
    folder.mkdir(parents=True)
    files = {
        "train-images-idx3-ubyte.gz": FIXTURES / "images-3x2x2.idx3.gz",
        "train-labels-idx1-ubyte.gz": FIXTURES / "labels-3.idx1.gz",
        "t10k-images-idx3-ubyte.gz": FIXTURES / "images-3x2x2.idx3",
        "t10k-labels-idx1-ubyte.gz": FIXTURES / "labels-3.idx1",
    }
    for name, source in files.items():
        shutil.copy(source, folder / name)
    register(monkeypatch, "mnist", files)
    return folder.parent


def test_load_mnist_fixture(mnist_root):
    data = load_mnist(root=mnist_root, download=False, dev_size=1)
    flat = IMAGES.reshape(3, 4).astype(np.float32) / 255
    for split, rows in [("train", slice(1, 3)), ("dev", slice(0, 1)), ("test", slice(0, 3))]:
        images, labels = data[split]  # a pair
        assert images.dtype == torch.float32 and labels.dtype == torch.int64
        assert images.shape == (len(flat[rows]), 4)
        np.testing.assert_allclose(images.numpy(), flat[rows], rtol=0, atol=1e-7)
        np.testing.assert_array_equal(labels.numpy(), LABELS[rows])
    assert data.dev.images[0].tolist() == pytest.approx([0.0, 1.0, 128 / 255, 1 / 255])
    assert data.name == "mnist" and data.num_classes == 10
    assert len(load_mnist(root=mnist_root, download=False, dev_size=0).dev.labels) == 0


def test_load_mnist_caches_decoding_not_tensors(mnist_root, monkeypatch):
    calls = []
    real = mnist_mod.read_idx
    monkeypatch.setattr(mnist_mod, "read_idx", lambda p: calls.append(p) or real(p))
    first = load_mnist(root=mnist_root, download=False, dev_size=1)
    assert len(calls) == 4
    first.train.images.fill_(0.5)  # callers may modify their tensors in place ...
    second = load_mnist(root=mnist_root, download=False, dev_size=1)
    assert len(calls) == 4  # ... decoded once per process ...
    assert second.train.images.max().item() == 1.0  # ... without touching the cache


def test_load_mnist_count_mismatch(mnist_root, monkeypatch):
    labels = mnist_root / "mnist" / "t10k-labels-idx1-ubyte.gz"
    labels.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 2, 1, 2]))  # 2 labels for 3 images
    register(monkeypatch, "mnist", {p.name: p for p in (mnist_root / "mnist").iterdir()})
    with pytest.raises(DataError, match="3 images in .* but 2 labels in .*counts must match"):
        load_mnist(root=mnist_root, download=False, dev_size=1)


def test_load_mnist_rejects_corrupt_file(mnist_root):
    path = mnist_root / "mnist" / "train-labels-idx1-ubyte.gz"
    blob = path.read_bytes()
    path.write_bytes(blob[:-1] + bytes([blob[-1] ^ 0xFF]))  # same size, last byte flipped
    with pytest.raises(ChecksumError, match="train-labels-idx1-ubyte.gz"):
        load_mnist(root=mnist_root, download=False, dev_size=1)


def test_load_mnist_bad_arguments(mnist_root):
    for bad in (-1, 3, 1.5):
        with pytest.raises(ValueError, match=f"dev_size={bad!r} is out of range"):
            load_mnist(root=mnist_root, download=False, dev_size=bad)
    with pytest.raises(ValueError, match="unknown dataset name 'digits'"):
        load_mnist("digits", root=mnist_root, download=False)


def test_load_fashion_uses_its_folder(mnist_root, monkeypatch):
    shutil.copytree(mnist_root / "mnist", mnist_root / "fashion_mnist")
    register(monkeypatch, "fashion_mnist", {p.name: p for p in (mnist_root / "mnist").iterdir()})
    shutil.rmtree(mnist_root / "mnist")
    data = load_mnist("fashion", root=mnist_root, download=False, dev_size=1)
    assert data.name == "fashion_mnist" and data.train.images.shape == (2, 4)


# --- CoNLL-U --------------------------------------------------------------------------------


def test_read_conllu_words_only():
    sentences = read_conllu(FIXTURES / "tiny.conllu")
    assert [s.sent_id for s in sentences] == ["tiny-1", "tiny-2", "tiny-3"]
    first, second, third = sentences
    # The multiword token "don't" (2-3) is skipped, its words "do" and "n't" kept.
    assert first.forms == ["I", "do", "n't", "know", "."]
    assert first.upos == ["PRON", "AUX", "PART", "VERB", "PUNCT"]
    assert first.xpos == ["PRP", "VBP", "RB", "VB", "."]
    assert first.heads == [4, 4, 4, 0, 4]
    assert first.deprels == ["nsubj", "aux", "advmod", "root", "punct"]
    # The empty node 5.1 is skipped.
    assert second.forms == ["Sue", "likes", "tea", "and", "Bob", "coffee"]
    assert second.heads == [2, 0, 2, 5, 2, 5]
    assert second.deprels == ["nsubj", "root", "obj", "cc", "conj", "orphan"]
    assert third.xpos == ["_", "."]  # '_' stays '_'
    assert [len(s) for s in sentences] == [5, 6, 2]


def test_read_conllu_crlf(tmp_path):
    path = tmp_path / "crlf.conllu"
    path.write_bytes((FIXTURES / "tiny.conllu").read_bytes().replace(b"\n", b"\r\n"))
    assert read_conllu(path) == read_conllu(FIXTURES / "tiny.conllu")


def test_read_conllu_malformed_fixture():
    path = FIXTURES / "malformed.conllu"
    with pytest.raises(ConlluError) as info:
        read_conllu(path)
    assert info.value.line == 10
    assert str(info.value).startswith(f"{path}:10: ")
    assert "HEAD 'two'" in str(info.value)


TINY_LINES = (FIXTURES / "tiny.conllu").read_text().split("\n")


@pytest.mark.parametrize(
    ("line", "replacement", "error_line", "message"),
    [
        # (1-based line of tiny.conllu to replace, new text, reported line, message)
        (6, "2\tdo\tdo\tAUX\tVBP\t_\t4\taux\t_", 6, "expected 10 TAB-separated columns, found 9"),
        (6, "2\tdo\tdo\tAUX\tVBP\t_\t4\taux\t_\t_\t_", 6, "found 11"),
        (6, "x\tdo\tdo\tAUX\tVBP\t_\t4\taux\t_\t_", 6, "invalid ID 'x'"),
        (6, "3\tdo\tdo\tAUX\tVBP\t_\t4\taux\t_\t_", 6, "word ID 3 out of order: expected 2"),
        (6, "2\tdo\tdo\tAUX\tVBP\t_\t_\taux\t_\t_", 6, "HEAD '_' of word 2 is not an integer"),
        (6, "2\tdo\tdo\tAUX\tVBP\t_\t-1\taux\t_\t_", 6, "HEAD '-1'"),
        (6, "2\tdo\tdo\tAUX\tVBP\t_\t6\taux\t_\t_", 6, "HEAD 6 is beyond the sentence's last"),
        (6, "2\tdo\tdo\tAUX\tVBP\t_\t4\t_\t_\t_", 6, "DEPREL of word 2 is missing"),
        (6, "2\tdo\t\tAUX\tVBP\t_\t4\taux\t_\t_", 6, "column LEMMA is empty"),
        (6, "2\tdo  it\tdo\tAUX\tVBP\t_\t4\taux\t_\t_", 6, "column FORM holds two spaces"),
        # A range backwards: our checks let it through, the conllu library rejects it, and
        # the error names the sentence's lines.
        (
            5,
            "3-2\tdon't\t_\t_\t_\t_\t_\t_\t_\t_",
            1,
            "lines 1-9: Failed parsing field 'id': '3-2' is not a valid ID",
        ),
        (21, "# only a comment", 21, "sentence block without any word lines"),
        # trees: a word its own head, two roots, no root
        (6, "2\tdo\tdo\tAUX\tVBP\t_\t2\taux\t_\t_", 6, "word 2 is its own head"),
        (6, "2\tdo\tdo\tAUX\tVBP\t_\t0\taux\t_\t_", 8, "2 roots (words 2, 4 have HEAD 0)"),
        (8, "4\tknow\tknow\tVERB\tVB\t_\t5\troot\t_\t_", 1, "no root (no word with HEAD 0)"),
    ],
)
def test_read_conllu_errors_name_the_line(tmp_path, line, replacement, error_line, message):
    lines = list(TINY_LINES)
    lines[line - 1] = replacement
    if line == 21:  # turn the third sentence into a comment-only block
        del lines[21:24]
    path = tmp_path / "bad.conllu"
    path.write_text("\n".join(lines))
    pattern = f"^{re.escape(str(path))}:{error_line}: .*{re.escape(message)}"
    with pytest.raises(ConlluError, match=pattern) as info:
        read_conllu(path)
    assert info.value.line == error_line


def test_read_conllu_rejects_cycles_and_empty_files(tmp_path):
    lines = list(TINY_LINES)
    lines[5] = "2\tdo\tdo\tAUX\tVBP\t_\t3\taux\t_\t_"  # 2 -> 3
    lines[6] = "3\tn't\tnot\tPART\tRB\t_\t2\tadvmod\t_\t_"  # 3 -> 2
    path = tmp_path / "cycle.conllu"
    path.write_text("\n".join(lines))
    with pytest.raises(
        ConlluError, match=r"cycle.conllu:6: the heads form a cycle \(words 2 -> 3 -> 2\)"
    ):
        read_conllu(path)
    for text in ("", "\n\n"):
        path.write_text(text)
        with pytest.raises(ConlluError, match=r"cycle.conllu:1: the file holds no sentence"):
            read_conllu(path)


def test_read_conllu_not_utf8(tmp_path):
    path = tmp_path / "latin1.conllu"
    path.write_bytes((FIXTURES / "tiny.conllu").read_bytes().replace(b"Sue", b"S\xfc"))
    with pytest.raises(ConlluError, match=r":12: not UTF-8"):
        read_conllu(path)


def test_load_ud_ewt_fixture(env, monkeypatch):
    folder = env / "root" / "ud_english_ewt"
    folder.mkdir(parents=True)
    names = ["en_ewt-ud-train.conllu", "en_ewt-ud-dev.conllu", "en_ewt-ud-test.conllu"]
    for name in names:
        shutil.copy(FIXTURES / "tiny.conllu", folder / name)
    register(monkeypatch, "ud_english_ewt", {name: folder / name for name in names})
    data = load_ud_ewt(env / "root", download=False)
    assert list(data) == ["train", "dev", "test"]
    assert [len(s) for s in data["dev"]] == [5, 6, 2]
    assert list(load_ud_ewt(env / "root", download=False, splits=["dev"])) == ["dev"]
    with pytest.raises(ValueError, match="unknown EWT split"):
        load_ud_ewt(env / "root", download=False, splits=["validation"])


def test_public_names():
    assert sorted(mdata.__all__) == sorted(set(mdata.__all__))
    for name in mdata.__all__:
        assert hasattr(mdata, name), name


# --- the real data, where $MEPROP_DATA has it ------------------------------------------------

REAL_ROOT = Path(os.environ.get("MEPROP_DATA") or "/nonexistent")


def needs_real(*files: str):
    missing = [f for f in files if not (REAL_ROOT / f).is_file()]
    return pytest.mark.skipif(
        bool(missing), reason=f"real data absent under $MEPROP_DATA: {missing}"
    )


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("mnist", marks=needs_real("mnist/train-images-idx3-ubyte.gz")),
        pytest.param("fashion", marks=needs_real("fashion_mnist/train-images-idx3-ubyte.gz")),
    ],
)
def test_real_mnist(name):
    data = load_mnist(name, root=REAL_ROOT, download=False)
    sizes = {split: len(data[split].labels) for split in ("train", "dev", "test")}
    assert sizes == {"train": 55_000, "dev": 5_000, "test": 10_000}
    for split in ("train", "dev", "test"):
        images, labels = data[split]
        assert images.shape == (sizes[split], 784) and images.dtype == torch.float32
        assert images.min().item() == 0.0 and images.max().item() == 1.0
        assert labels.dtype == torch.int64 and set(labels.unique().tolist()) == set(range(10))
    if name == "fashion":  # 6,000 of each class in the full training set
        counts = torch.bincount(torch.cat([data.train.labels, data.dev.labels]), minlength=10)
        assert counts.tolist() == [6000] * 10


@needs_real("ud_english_ewt/en_ewt-ud-dev.conllu")
def test_real_ewt_dev():
    dev = load_ud_ewt(REAL_ROOT, download=False, splits=["dev"])["dev"]
    assert len(dev) == 2001
    assert sum(len(s) for s in dev) == 25_147
    assert all(s.heads.count(0) == 1 for s in dev)  # one root per sentence
