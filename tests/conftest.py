"""Shared test settings: small thread count, deterministic seeds, the data root for CI."""

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def pytest_configure(config):
    # backend="auto" takes its untimed default order in the suite, so that which
    # implementation runs (and so the last bits of a gradient) does not depend on a timing;
    # tests/test_dispatch.py turns the timing on.
    os.environ.setdefault("MEPROP_AUTOTUNE", "0")
    # CI points MEPROP_DATA at ../shared/data; do the same when it is beside the checkout.
    if "MEPROP_DATA" not in os.environ and SHARED_DATA.is_dir():
        os.environ["MEPROP_DATA"] = str(SHARED_DATA)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-tensor tests: threads only add synchronisation
    (and on a busy 2-core machine, spinning OpenMP workers make each op milliseconds slower).
    Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def write_idx(path: Path, array) -> None:
    """An IDX file (gzipped) of a uint8 numpy array."""
    import gzip
    import struct

    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


@pytest.fixture
def tiny_mnist(tmp_path, monkeypatch):
    """A data root with a tiny learnable 'MNIST' (28x28, 10 classes), registered checksums.

    Class c lights up a 4x4 patch at a position of its own, plus noise: a few steps suffice.
    200 training images (the first 50 are the dev set) and 60 test images.
    """
    import hashlib

    import numpy as np

    from meprop.experiments.data import DATASETS
    from meprop.experiments.data.download import Dataset, RemoteFile
    from meprop.experiments.tasks.mnist import MnistTask

    rng = np.random.default_rng(0)
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)

    def make(n):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(labels):
            r, col = 2 + 6 * (c // 4), 2 + 6 * (c % 4)
            images[i, r : r + 4, col : col + 4] = 255
        return images, labels

    files = {}
    for prefix, n in (("train", 200), ("t10k", 60)):
        images, labels = make(n)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    for p in folder.iterdir():
        blob = p.read_bytes()
        files[p.name] = RemoteFile(hashlib.sha256(blob).hexdigest(), len(blob))
    monkeypatch.setitem(DATASETS, "mnist", Dataset("mnist", "http://127.0.0.1:9/", files))
    monkeypatch.setattr(MnistTask, "dev_size", 50)
    return folder.parent


# A tiny treebank from a toy grammar: "the/DT big/JJ dog/NN sees/VBZ a/DT cat/NN ./.", with
# projective trees (det and amod to the noun, nsubj and obj to the verb, punct to the verb).
_NOUNS = ("dog", "cat", "bird", "fish", "man")
_ADJS = ("big", "small", "red", "old")
_VERBS = ("sees", "likes", "eats", "finds")


def _toy_sentence(rng, number: int) -> str:
    words = []  # (form, upos, xpos, head, deprel), heads filled below

    def noun_phrase():
        start = len(words) + 1
        words.append([rng.choice(["the", "a"]), "DET", "DT", 0, "det"])
        adj = rng.random() < 0.5
        if adj:
            words.append([rng.choice(_ADJS), "ADJ", "JJ", 0, "amod"])
        noun = len(words) + 1
        words.append([rng.choice(_NOUNS), "NOUN", "NN", 0, "_"])
        for i in range(start, noun):
            words[i - 1][3] = noun
        return noun

    subj = noun_phrase()
    verb = len(words) + 1
    words.append([rng.choice(_VERBS), "VERB", "VBZ", 0, "root"])
    obj = noun_phrase()
    words.append([".", "PUNCT", ".", verb, "punct"])
    words[subj - 1][3:] = [verb, "nsubj"]
    words[obj - 1][3:] = [verb, "obj"]
    lines = [f"# sent_id = toy-{number}"]
    for i, (form, upos, xpos, head, deprel) in enumerate(words, start=1):
        lines.append(f"{i}\t{form}\t{form}\t{upos}\t{xpos}\t_\t{head}\t{deprel}\t_\t_")
    return "\n".join(lines) + "\n\n"


@pytest.fixture
def tiny_ewt(tmp_path, monkeypatch):
    """A data root whose ``ud_english_ewt/`` holds toy train (60 sentences), dev and test (20
    each) files, with checksums registered: the POS and parsing tasks run on it in seconds."""
    import hashlib
    import random

    from meprop.experiments.data import DATASETS
    from meprop.experiments.data.conllu import EWT_SPLITS
    from meprop.experiments.data.download import Dataset, RemoteFile

    rng = random.Random(0)
    folder = tmp_path / "data" / "ud_english_ewt"
    folder.mkdir(parents=True)
    files = {}
    for split, n in (("train", 60), ("dev", 20), ("test", 20)):
        text = "".join(_toy_sentence(rng, i) for i in range(n))
        path = folder / EWT_SPLITS[split]
        path.write_text(text)
        blob = path.read_bytes()
        files[path.name] = RemoteFile(hashlib.sha256(blob).hexdigest(), len(blob))
    monkeypatch.setitem(
        DATASETS, "ud_english_ewt", Dataset("ud_english_ewt", "http://127.0.0.1:9/", files)
    )
    return folder.parent
