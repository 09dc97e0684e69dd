"""The data layer: MNIST, Fashion-MNIST and UD English EWT, found or downloaded and checked.

Data roots are searched in order: an explicit ``data_dir`` (``--data-dir``), ``$MEPROP_DATA``,
then the user cache (``$XDG_CACHE_HOME/meprop`` or ``~/.cache/meprop``). Every file is pinned
by its SHA-256. Reading CoNLL-U needs the optional ``conllu`` package (``meprop[experiments]``).
"""

from .conllu import EWT_SPLITS, ConlluError, Sentence, load_ud_ewt, read_conllu
from .download import (
    DATASETS,
    MIRROR_ENV_VAR,
    ChecksumError,
    DataNotFoundError,
    Dataset,
    DownloadError,
    RemoteFile,
    ensure_file,
    file_url,
    sha256_file,
)
from .idx import IdxError, read_idx
from .mnist import MnistData, Split, load_mnist
from .paths import ENV_VAR, DataError, cache_dir, data_roots, resolve_data_root

__all__ = [
    # where the data lives
    "ENV_VAR",
    "MIRROR_ENV_VAR",
    "cache_dir",
    "data_roots",
    "resolve_data_root",
    # the registry and downloads
    "DATASETS",
    "Dataset",
    "RemoteFile",
    "ensure_file",
    "file_url",
    "sha256_file",
    # readers and loaders
    "read_idx",
    "load_mnist",
    "MnistData",
    "Split",
    "read_conllu",
    "load_ud_ewt",
    "Sentence",
    "EWT_SPLITS",
    # errors
    "DataError",
    "DataNotFoundError",
    "ChecksumError",
    "DownloadError",
    "IdxError",
    "ConlluError",
]
