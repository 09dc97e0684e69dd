"""Part-of-speech tagging on UD English EWT with a bi-LSTM (the paper's tagger).

Model: token embedding -> bidirectional LSTM (``layers`` layers, hidden = the run's first width
per direction) -> dropout -> a linear output layer over the tags. A token's embedding is the
concatenation of three: its lowercased word (dim 100), its last three letters (dim 30: the
suffix carries most of an unknown word's tag) and its casing (dim 8: lower, Capitalised, ALL
CAPS, mIxed; lowercasing would otherwise hide proper nouns). meProp goes on the
LSTM only (top-k of its gate gradients at every step); the output layer stays dense. meSimp
shrinks the LSTM's memory cells per direction (groups ``lstm.l0`` and ``lstm.l0_reverse``) and
the output layer's input columns with them.

Tags: XPOS (the Penn Treebank tags, the paper's setting) by default, UPOS with ``tags="upos"``.
Tags are indexed from the training set; a dev/test tag never seen in training counts as an
error.

Words: lowercased; the vocabulary is the training words (after ``train_limit``) seen at least
twice, plus ``<pad>`` and ``<unk>``. Unknown-word handling: an unknown word maps to one of a few
word-shape classes instead of a single ``<unk>``: ``<unk:num>`` (has a digit), ``<unk:punct>``
(no letter or digit), ``<unk:cap>`` (first letter upper case), ``<unk:-ing>``, ``<unk:-ed>``,
``<unk:-ly>``, ``<unk:-s>``, ``<unk:hyphen>``, else ``<unk>``; and it keeps its suffix and
casing features. Suffixes seen in fewer than two training words map to ``<unk>``.

Batches: sentences shuffled with the run's generator, ``batch_size`` sentences per batch,
padded to (T, B, 3) token features (word, suffix, casing) and packed
(``pack_padded_sequence(enforce_sorted=False)``) for the LSTM.
The loss is the mean token cross-entropy over real (non-pad) tokens.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence, pad_sequence

from meprop.simplify import Pair

from ..data.conllu import load_ud_ewt
from ..settings import setting

__all__ = [
    "BiLSTMTagger", "PosTask", "word_key", "suffix_key", "case_class", "SHAPES", "CASES",
    "TaggerSettings", "TAGS",
]  # fmt: skip


TAGS = ("xpos", "upos")  # the tag column the pos and parse tasks read


@dataclass(frozen=True)
class TaggerSettings:
    """The pos and parse tasks' setting: which tag column they read (checked by
    ``tasks.check_config``)."""

    tags: str = setting(
        "xpos", "pos and parse tasks: tag column, xpos (Penn Treebank) or upos", TAGS
    )


PAD, UNK = "<pad>", "<unk>"
SHAPES = (
    "<unk:num>",
    "<unk:punct>",
    "<unk:cap>",
    "<unk:-ing>",
    "<unk:-ed>",
    "<unk:-ly>",
    "<unk:-s>",
    "<unk:hyphen>",
)
IGNORE = -100  # padding and tags unseen in training: no loss, never predicted


def word_key(word: str) -> str:
    """The vocabulary key of a word: lowercased."""
    return word.lower()


def suffix_key(word: str) -> str:
    """The suffix feature of a word: its last three characters, lowercased."""
    return word.lower()[-3:]


CASES = ("<pad>", "lower", "Capitalised", "UPPER", "mIxed")


def case_class(word: str) -> int:
    """Index in ``CASES`` of a word's casing; words without letters count as lower."""
    if word.islower() or not any(c.isalpha() for c in word):
        return 1
    if word.isupper():
        return 3
    if word[0].isupper() and word[1:].islower():
        return 2
    return 4


def shape_class(word: str) -> str:
    """The unknown-word token of a word not in the vocabulary (see the module docstring)."""
    if any(c.isdigit() for c in word):
        return "<unk:num>"
    if not any(c.isalpha() for c in word):
        return "<unk:punct>"
    if word[0].isupper():
        return "<unk:cap>"
    w = word.lower()
    for suffix in ("ing", "ed", "ly"):
        if w.endswith(suffix):
            return f"<unk:-{suffix}>"
    if w.endswith("s"):
        return "<unk:-s>"
    if "-" in w:
        return "<unk:hyphen>"
    return UNK


class BiLSTMTagger(nn.Module):
    """Token embeddings -> bi-LSTM -> dropout -> Linear.

    ``forward(tokens (T, B, 3), lengths (B,))`` gives tag scores (T, B, n_tags); a token is its
    (word, suffix, casing) indices.
    """

    def __init__(
        self,
        vocab_size: int,
        n_tags: int,
        hidden: int,
        emb_dim: int = 100,
        dropout: float = 0.0,
        num_layers: int = 1,
        n_suffixes: int = 2,
        suffix_dim: int = 30,
        case_dim: int = 8,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, emb_dim, padding_idx=0)
        self.suffix = nn.Embedding(n_suffixes, suffix_dim, padding_idx=0)
        self.case = nn.Embedding(len(CASES), case_dim, padding_idx=0)
        # (nn.LSTM's dropout acts between layers only: it warns when there is one layer)
        self.lstm = nn.LSTM(
            emb_dim + suffix_dim + case_dim,
            hidden,
            num_layers=num_layers,
            bidirectional=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * hidden, n_tags)

    def simplify_pairs(self) -> list[Pair]:
        return [Pair("lstm", ("head",))]

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = torch.cat(
            [self.embed(tokens[..., 0]), self.suffix(tokens[..., 1]), self.case(tokens[..., 2])],
            dim=-1,
        )  # (T, B, emb + suffix + case)
        packed = pack_padded_sequence(x, lengths.cpu(), enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, total_length=tokens.shape[0])
        return self.head(self.dropout(out))

    def widths(self) -> list[int]:
        """The LSTM's hidden width per layer and direction: [l0 forward, l0 backward, ...]."""
        sizes = getattr(self.lstm, "sizes", None)
        if sizes is not None:
            return [int(h) for _, h in sorted(sizes().items())]
        return [self.lstm.hidden_size] * (2 * self.lstm.num_layers)


class PosTask:
    metric = "accuracy"
    train_eval_size = 2000  # training sentences scored each epoch for the learning curves
    emb_dim = 100
    eval_batch = 256

    def __init__(self, cfg, data_dir=None) -> None:
        tags = cfg.tags
        if tags not in ("xpos", "upos"):
            raise ValueError(f"tags must be 'xpos' or 'upos', got {tags!r}")
        if cfg.activation != "tanh":
            raise ValueError(
                f"the pos task's LSTM has a fixed tanh activation, got activation="
                f"{cfg.activation!r}: leave --activation unset"
            )
        if cfg.scope == "global" and cfg.mode == "unified":
            raise ValueError(
                "the pos task's LSTM supports unified selection per rank only (scope='local'): "
                "its ranks' batches have different numbers of time steps; leave --scope unset"
            )
        if len(set(cfg.widths())) != 1:
            raise ValueError(
                f"the pos task's LSTM layers share one width, got hidden={list(cfg.hidden)}: "
                "give one width and --layers"
            )
        data = load_ud_ewt(root=data_dir)
        train = data["train"][: cfg.train_limit] if cfg.train_limit else data["train"]
        counts = Counter(word_key(w) for s in train for w in s.forms)
        self.vocab = [PAD, UNK, *SHAPES] + sorted(w for w, n in counts.items() if n >= 2)
        self.word_index = {w: i for i, w in enumerate(self.vocab)}
        suffixes = Counter(suffix_key(w) for w in counts)  # over distinct words
        self.suffixes = [PAD, UNK] + sorted(x for x, n in suffixes.items() if n >= 2)
        self.suffix_index = {x: i for i, x in enumerate(self.suffixes)}
        self.tagset = sorted({t for s in train for t in getattr(s, tags)})
        self.tag_index = {t: i for i, t in enumerate(self.tagset)}
        self.tags = tags

        def encode(sentences):
            return [self._encode(s) for s in sentences if len(s)]

        self.splits = {
            "train": encode(train),
            "dev": encode(data["dev"]),
            "test": encode(data["test"]),
        }
        self.splits["train_eval"] = self.splits["train"][: self.train_eval_size]

    def _encode(self, sentence) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (L, 3): word, suffix and casing indices; tags (L,))."""
        wi, si = self.word_index, self.suffix_index
        tokens = [
            (wi.get(word_key(w), wi[shape_class(w)]), si.get(suffix_key(w), 1), case_class(w))
            for w in sentence.forms
        ]
        tags = [self.tag_index.get(t, IGNORE) for t in getattr(sentence, self.tags)]
        return torch.tensor(tokens).reshape(-1, 3), torch.tensor(tags)

    def build_model(self, widths: list[int], cfg) -> BiLSTMTagger:
        return BiLSTMTagger(
            len(self.vocab),
            len(self.tagset),
            widths[0],
            self.emb_dim,
            cfg.dropout,
            len(widths),
            n_suffixes=len(self.suffixes),
        )

    def sparsify_filter(self, model):
        return lambda module, name: name == "lstm"

    def hidden_layers(self, model) -> list[nn.Module]:
        return [model.lstm]

    def widths(self, model) -> list[int]:
        return model.widths()

    @staticmethod
    def dense_hidden(final_widths: dict[str, int]) -> tuple[int, ...]:
        """One width for a dense tagger the size of a meSimp'd one: nn.LSTM gives both
        directions of every layer one width, so take the mean (rounded up)."""
        return (-(-sum(final_widths.values()) // len(final_widths)),)

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-len(self.splits["train"]) // batch_size)

    @staticmethod
    def collate(items) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tokens (T, B, 3), tags (T, B) with IGNORE past each end, lengths (B,))."""
        words = pad_sequence([w for w, _ in items], padding_value=0)
        tags = pad_sequence([t for _, t in items], padding_value=IGNORE)
        lengths = torch.tensor([len(w) for w, _ in items])
        return words, tags, lengths

    def batches(self, split: str, batch_size: int, generator: torch.Generator):
        data = self.splits[split]
        order = torch.randperm(len(data), generator=generator).tolist()
        for i in range(0, len(data), batch_size):
            yield self.collate([data[j] for j in order[i : i + batch_size]])

    @staticmethod
    def split_batch(batch, parts: int) -> list:
        """``parts`` batches of consecutive sentences (the ranks' parts of a global batch), each
        cut to its own longest sentence."""
        words, tags, lengths = batch
        out = []
        for idx in torch.arange(len(lengths)).tensor_split(parts):
            a, b = (int(idx[0]), int(idx[-1]) + 1) if len(idx) else (0, 0)
            t = int(lengths[a:b].max()) if b > a else 0
            out.append((words[:t, a:b], tags[:t, a:b], lengths[a:b]))
        return out

    @staticmethod
    def loss_terms(batch) -> int:
        """The number of tokens the loss averages over (real tokens with a tag seen in
        training)."""
        return int((batch[1] != IGNORE).sum())

    def loss(self, model, batch) -> torch.Tensor:
        words, tags, lengths = batch
        scores = model(words, lengths)
        return nn.functional.cross_entropy(
            scores.reshape(-1, scores.shape[-1]), tags.reshape(-1), ignore_index=IGNORE
        )

    @torch.no_grad()
    def evaluate(self, model, split: str) -> dict[str, float]:
        was_training = model.training
        model.eval()
        data = self.splits[split]
        order = sorted(range(len(data)), key=lambda i: len(data[i][0]))  # little padding
        correct = total = 0
        for i in range(0, len(order), self.eval_batch):
            words, tags, lengths = self.collate([data[j] for j in order[i : i + self.eval_batch]])
            pred = model(words, lengths).argmax(-1)
            real = torch.arange(words.shape[0])[:, None] < lengths[None, :]
            correct += int(((pred == tags) & real).sum())
            total += int(lengths.sum())
        model.train(was_training)
        return {"accuracy": correct / max(1, total)}
