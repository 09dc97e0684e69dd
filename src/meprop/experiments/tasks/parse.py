"""Dependency parsing on UD English EWT: Chen & Manning's (2014) greedy transition-based parser.

The paper's parsing experiment. Arc-standard transitions and the 48 features are in
``arcstandard``. The model embeds the 18 word, 18 tag and 12 label ids (50 dimensions each),
concatenates them (48 x 50 = 2400 inputs) and scores the 2L + 1 transitions with an MLP:
Linear(2400, 500) -> cube (``--activation relu``/``tanh`` also work) -> dropout -> Linear. meProp
goes on the hidden Linear; the output layer stays dense; meSimp shrinks the hidden layer (and the
output layer's input columns), which it reads off the ``mlp`` nn.Sequential chain.

Data choices:

* Tags: gold XPOS (the Penn Treebank tags, as Chen & Manning on the PTB) by default, gold UPOS
  with ``tags="upos"``. Predicted tags are not supported.
* Words: lowercased; the vocabulary is the training words seen at least twice; any other word
  maps to one of the POS tagger's word-shape classes (``pos.shape_class``).
* Labels: the full deprels of the training set (subtypes kept: ``nmod:poss``), 51 in EWT train,
  so 103 transitions. LAS compares full deprels; a label unseen in training counts as an error.
* Training examples: the (48 features, gold transition) pairs of the static oracle over the
  projective training sentences, computed once per process (cached: a reproduce grid reuses
  them) and held as one int32 tensor. The 288 non-projective training sentences of EWT (2.3%)
  are skipped, since arc-standard cannot build their trees; dev and test parse every sentence.
* Evaluation: greedy decoding, batched across sentences (one forward scores the current state
  of every unfinished sentence; each takes its best legal transition). ``uas`` and ``las``
  exclude punctuation (UPOS PUNCT), as Chen & Manning's evaluation; ``uas_punct`` and
  ``las_punct`` count every word. The main metric (model selection) is ``uas``.
  ``sents_per_s`` is the decoding speed of that evaluation.
* ``train_limit``: the first N training sentences (before skipping non-projective ones).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data.conllu import Sentence, load_ud_ewt
from .arcstandard import (
    N_FEATURES,
    N_TAG,
    N_WORD,
    State,
    Transitions,
    features,
    is_projective,
    oracle_examples,
)
from .mnist import build_mlp
from .pos import SHAPES, shape_class, word_key

__all__ = ["ParserMLP", "ParseTask", "Vocab", "attachment_scores", "parse"]

NULL, ROOT, UNK = "<null>", "<root>", "<unk>"


class Vocab:
    """Word, tag and label ids built from training sentences.

    Words: 0 NULL, 1 ROOT, 2 unknown, then the shape classes, then the training words seen at
    least twice (lowercased). Tags: 0 NULL, 1 ROOT, 2 unknown, then the training tags. Labels:
    the training deprels, sorted; as feature ids they are shifted by one (0 is NULL).
    """

    def __init__(self, train: Sequence[Sentence], tags: str = "xpos") -> None:
        if tags not in ("xpos", "upos"):
            raise ValueError(f"tags must be 'xpos' or 'upos', got {tags!r}")
        self.tag_column = tags
        counts = Counter(word_key(w) for s in train for w in s.forms)
        self.words = [NULL, ROOT, UNK, *SHAPES] + sorted(w for w, c in counts.items() if c >= 2)
        self.tags = [NULL, ROOT, UNK] + sorted({t for s in train for t in getattr(s, tags)})
        self.word_index = {w: i for i, w in enumerate(self.words)}
        self.tag_index = {t: i for i, t in enumerate(self.tags)}
        self.transitions = Transitions(sorted({r for s in train for r in s.deprels}))

    def encode(self, sentence: Sentence) -> tuple[list[int], list[int]]:
        """Word and tag ids of a sentence with ROOT's in front and NULL's at the end (n + 2)."""
        wi, ti = self.word_index, self.tag_index
        words = [wi.get(word_key(w)) or wi[shape_class(w)] for w in sentence.forms]
        tags = [ti.get(t, 2) for t in getattr(sentence, self.tag_column)]
        return [1, *words, 0], [1, *tags, 0]

    def label_ids(self, sentence: Sentence) -> list[int]:
        """Label index of each word's gold deprel (-1 if unseen in training)."""
        return [self.transitions.index.get(r, -1) for r in sentence.deprels]


class ParserMLP(nn.Module):
    """Embeddings of the 48 feature ids -> concatenation -> ``mlp``; ``forward(feats (B, 48))``
    gives transition scores (B, T).

    ``mlp`` is ``build_mlp(48 * emb_dim, widths, n_transitions, dropout, activation)``: a plain
    nn.Sequential, so meSimp finds the hidden -> output pair by itself.
    """

    emb_std = 0.1

    def __init__(
        self,
        n_words: int,
        n_tags: int,
        n_labels: int,
        n_transitions: int,
        widths: Sequence[int] = (500,),
        emb_dim: int = 50,
        dropout: float = 0.0,
        activation: str = "cube",
    ) -> None:
        super().__init__()
        self.words = nn.Embedding(n_words, emb_dim)
        self.tags = nn.Embedding(n_tags, emb_dim)
        self.labels = nn.Embedding(n_labels + 1, emb_dim)  # + NULL
        for emb in (self.words, self.tags, self.labels):
            # std 0.1, not nn.Embedding's 1: the hidden layer's inputs are then ~0.06 and the
            # cube's outputs small at first; with std 1 cube training diverges now and then.
            nn.init.normal_(emb.weight, std=self.emb_std)
        self.mlp = build_mlp(N_FEATURES * emb_dim, list(widths), n_transitions, dropout, activation)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        w = self.words(feats[:, :N_WORD])  # (B, 18, emb)
        t = self.tags(feats[:, N_WORD : N_WORD + N_TAG])  # (B, 18, emb)
        lab = self.labels(feats[:, N_WORD + N_TAG :])  # (B, 12, emb)
        return self.mlp(torch.cat([w, t, lab], dim=1).flatten(1))  # (B, 48 * emb) -> (B, T)

    def hidden_layers(self) -> list[nn.Linear]:
        return [m for m in self.mlp if isinstance(m, nn.Linear)][:-1]


@torch.no_grad()
def parse(
    model: nn.Module,
    sentences: Sequence[tuple[Sequence[int], Sequence[int]]],
    transitions: Transitions,
    batch_size: int = 1000,
) -> list[tuple[list[int], list[int]]]:
    """Greedy arc-standard parsing, batched across sentences.

    Each round extracts the features of every unfinished sentence's state, scores them all
    with one forward pass, and applies each state's best legal transition; a sentence of n
    words is done after 2n rounds. The caller sets ``model.eval()``.

    Args:
        model: maps feature ids (B, 48) to transition scores (B, len(transitions)).
        sentences: (word ids, tag ids) of each sentence, as ``Vocab.encode`` gives them.
        transitions: the transition ids the model scores.
        batch_size: sentences parsed together (memory: a (batch_size, 48 * emb) input).

    Returns:
        (heads, label indices) per sentence, each a list of n entries (heads 1-based, 0 = ROOT).
    """
    kinds = torch.tensor(transitions.kinds)  # (T,) SHIFT/LEFT/RIGHT of each transition
    t_kind, t_label = transitions.kinds, transitions.labels
    out: list[tuple[list[int], list[int]]] = []
    for start in range(0, len(sentences), batch_size):
        chunk = sentences[start : start + batch_size]
        states = [State(len(words) - 2) for words, _ in chunk]
        active = [i for i, s in enumerate(states) if not s.terminal()]
        while active:
            feats = torch.tensor([features(states[i], *chunk[i]) for i in active])  # (B, 48)
            legal = torch.tensor(
                [
                    (states[i].can_shift(), states[i].can_left(), states[i].can_right())
                    for i in active
                ]
            )  # (B, 3): SHIFT, LEFT, RIGHT legal
            scores = model(feats).float()  # (B, T)
            scores.masked_fill_(~legal[:, kinds], -torch.inf)
            for i, t in zip(active, scores.argmax(1).tolist(), strict=True):
                states[i].apply(t_kind[t], t_label[t])
            active = [i for i in active if not states[i].terminal()]
        out += [(s.heads[1:-1], s.labels[1:-1]) for s in states]
    return out


def attachment_scores(
    gold: Sequence[Sentence], pred: Sequence[tuple[Sequence[int], Sequence[str]]]
) -> dict[str, float]:
    """UAS and LAS of predicted (heads, deprels) against gold sentences.

    ``uas``/``las`` leave out the words whose gold UPOS is PUNCT; ``uas_punct``/``las_punct``
    count every word. Fractions in [0, 1].
    """
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sentences but {len(pred)} parses")
    n = {"all": 0, "words": 0}
    correct = Counter()
    for g, (heads, rels) in zip(gold, pred, strict=True):
        if len(heads) != len(g) or len(rels) != len(g):
            raise ValueError(
                f"sentence {g.sent_id!r} has {len(g)} words, its parse {len(heads)} heads and "
                f"{len(rels)} labels"
            )
        for gh, gr, upos, h, r in zip(g.heads, g.deprels, g.upos, heads, rels, strict=True):
            scored = upos != "PUNCT"
            n["all"] += 1
            n["words"] += scored
            if gh == h:
                correct["uas_punct"] += 1
                correct["uas"] += scored
                if gr == r:
                    correct["las_punct"] += 1
                    correct["las"] += scored
    return {
        key: correct[key] / max(1, n["all" if key.endswith("_punct") else "words"])
        for key in ("uas", "las", "uas_punct", "las_punct")
    }


@dataclass
class _Data:
    vocab: Vocab
    feats: torch.Tensor  # (N, 48) int32: the features of every oracle state
    gold: torch.Tensor  # (N,) int64: the oracle's transition id there
    splits: dict[str, list[Sentence]]  # train_eval, dev, test: the gold sentences to parse
    encoded: dict[str, list[tuple[list[int], list[int]]]]
    train_sentences: int
    skipped: int  # non-projective training sentences left out
    seconds: float  # time to build the examples (oracle + features)


_CACHE: dict[tuple, _Data] = {}


def _prepare(data_dir, tags: str, train_limit: int, train_eval_size: int) -> _Data:
    """Vocabulary, oracle examples and encoded splits; cached per process (one entry)."""
    key = (
        str(Path(data_dir).resolve()) if data_dir is not None else None,
        os.environ.get("MEPROP_DATA"),
        tags,
        train_limit,
        train_eval_size,
    )
    if key in _CACHE:
        return _CACHE[key]
    data = load_ud_ewt(root=data_dir)
    train = data["train"][:train_limit] if train_limit else data["train"]
    vocab = Vocab(train, tags)
    t0 = time.perf_counter()
    feats: list[list[int]] = []
    gold: list[int] = []
    skipped = 0
    for s in train:
        if not is_projective(s.heads):
            skipped += 1
            continue
        f, g = oracle_examples(s.heads, vocab.label_ids(s), *vocab.encode(s), vocab.transitions)
        feats += f
        gold += g
    splits = {"train_eval": train[:train_eval_size], "dev": data["dev"], "test": data["test"]}
    prepared = _Data(
        vocab=vocab,
        feats=torch.tensor(feats, dtype=torch.int32).reshape(-1, N_FEATURES),
        gold=torch.tensor(gold, dtype=torch.int64),
        splits=splits,
        encoded={k: [vocab.encode(s) for s in v] for k, v in splits.items()},
        train_sentences=len(train),
        skipped=skipped,
        seconds=time.perf_counter() - t0,
    )
    _CACHE.clear()  # one entry: the examples of full EWT take ~80 MB
    _CACHE[key] = prepared
    return prepared


class ParseTask:
    metric = "uas"
    train_eval_size = 1000  # training sentences parsed each epoch for the learning curves
    emb_dim = 50
    decode_batch = 1000  # sentences parsed together

    def __init__(self, cfg, data_dir=None) -> None:
        data = _prepare(data_dir, cfg.tags, cfg.train_limit, self.train_eval_size)
        if len(data.gold) == 0:
            raise ValueError(
                f"no projective training sentence among the first {data.train_sentences}: "
                "raise --train-limit"
            )
        self.data = data
        self.vocab = data.vocab
        self.transitions = data.vocab.transitions

    def build_model(self, widths: list[int], cfg) -> ParserMLP:
        v = self.vocab
        return ParserMLP(
            len(v.words),
            len(v.tags),
            len(v.transitions.names),
            len(v.transitions),
            widths,
            self.emb_dim,
            cfg.dropout,
            cfg.activation,
        )

    def sparsify_filter(self, model: ParserMLP):
        hidden = {id(m) for m in model.hidden_layers()}
        return lambda module, name: id(module) in hidden

    def hidden_layers(self, model: ParserMLP) -> list[nn.Linear]:
        return model.hidden_layers()

    def widths(self, model: ParserMLP) -> list[int]:
        return [m.out_features for m in model.hidden_layers()]

    @staticmethod
    def dense_hidden(final_widths: dict[str, int]) -> tuple[int, ...]:
        """The hidden widths of a dense parser the size of a meSimp'd one (one per layer)."""
        return tuple(final_widths.values())

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-len(self.data.gold) // batch_size)

    def batches(self, split: str, batch_size: int, generator: torch.Generator):
        if split != "train":
            raise ValueError(f"the parse task trains on split 'train' only, got {split!r}")
        feats, gold = self.data.feats, self.data.gold
        order = torch.randperm(len(gold), generator=generator)
        for i in range(0, len(gold), batch_size):
            idx = order[i : i + batch_size]
            yield feats[idx].long(), gold[idx]

    def loss(self, model, batch) -> torch.Tensor:
        feats, gold = batch
        return nn.functional.cross_entropy(model(feats), gold)  # mean over the batch

    def parse(self, model, sentences: Sequence[Sentence]) -> list[tuple[list[int], list[str]]]:
        """(heads, deprels) of each sentence, parsed greedily by ``model``."""
        return self._parse(model, [self.vocab.encode(s) for s in sentences])[0]

    def _parse(self, model, enc) -> tuple[list[tuple[list[int], list[str]]], float]:
        """Parses of encoded sentences (in their order) and the seconds they took."""
        was_training = model.training
        model.eval()
        order = sorted(range(len(enc)), key=lambda i: len(enc[i][0]))  # similar lengths together
        t0 = time.perf_counter()
        parsed = parse(model, [enc[i] for i in order], self.transitions, self.decode_batch)
        seconds = time.perf_counter() - t0
        model.train(was_training)
        names = self.transitions.names
        pred: list = [None] * len(enc)
        for i, (heads, rels) in zip(order, parsed, strict=True):
            pred[i] = (heads, [names[r] for r in rels])
        return pred, seconds

    def evaluate(self, model, split: str) -> dict[str, float]:
        pred, seconds = self._parse(model, self.data.encoded[split])
        scores = attachment_scores(self.data.splits[split], pred)
        return {**scores, "sents_per_s": len(pred) / max(seconds, 1e-9)}
