"""Byte-level language modelling on UD English EWT with a small decoder-only transformer.

Data: the ``# text = ...`` line of every sentence of the treebank's own train / dev / test files,
each followed by a newline, as UTF-8 bytes: one byte stream per split (vocabulary: the 256 byte
values). ``train_limit`` keeps the first N training sentences.

Model (nanoGPT's layout): byte and position embeddings -> ``layers`` pre-norm blocks
``x + attn(ln(x))``, ``x + mlp(ln(x))`` with causal multi-head self-attention and a GELU MLP
``d_model -> d_ff -> d_model`` -> final LayerNorm -> a linear output layer over the bytes.
``d_ff`` is the run's hidden width (one per block); ``d_model`` is ``TrainConfig.d_model``
(``--d-model``), by default a quarter of the first (rounded down to a multiple of the 4 heads),
as in GPT-2; the dense size control of a meSimp run keeps the run's.

meProp goes on the MLP projections (``mlp.fc``, ``mlp.proj``); the attention projections and the
output layer stay dense (``TrainConfig.sparse_attention``, ``--sparse-attention``, includes
``attn.qkv`` and ``attn.out``, at the same k); ``TrainConfig.fc_only`` (``--fc-only``) leaves
``mlp.proj`` dense too, so k counts MLP units only (``mlp.proj``'s output is d_model). meSimp
shrinks each block's MLP width: ``mlp.fc``'s units with ``mlp.proj``'s input columns.

Batches: ``(x, y)`` (B, T) windows of the stream, ``y`` the next bytes; an epoch takes
non-overlapping windows from a random offset, in random order. The metric is bits per byte
(the mean cross-entropy over every byte of the split, in bits); the trainer keeps the largest
score, so the task's ``metric`` is ``neg_bpb`` (its negation), and ``bpb`` is reported beside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from meprop.simplify import Pair

from ..data.conllu import EWT_DATASET, EWT_SPLITS
from ..data.download import ensure_file
from ..errors import ConfigError
from ..settings import setting

__all__ = ["ByteLM", "LmTask", "read_texts", "check_config", "LMSettings"]


@dataclass(frozen=True)
class LMSettings:
    """The lm task's own settings, checked by ``check_config`` below."""

    sparse_attention: bool = setting(
        False,
        "lm task: meProp on the attention projections (qkv, out) too, at the same k (k at or "
        "above a projection's width leaves it dense); default: the MLP only",
    )
    d_model: int = setting(
        0,
        "lm task: the transformer's width (0: a quarter of the first hidden width, a multiple "
        "of the 4 heads); a dense net at a meSimp run's widths keeps the run's d_model",
    )
    fc_only: bool = setting(
        False,
        "lm task: meProp on mlp.fc only (its output is the MLP width), mlp.proj (output "
        "d_model) dense; default: both MLP projections",
    )


VOCAB = 256
IGNORE = -100
N_HEAD = 4


def check_config(cfg) -> None:
    """The lm task's own settings of ``cfg`` (a ``TrainConfig``): ``d_model``, and
    ``sparse_attention`` and ``fc_only``, which put meProp on some projections and so need a
    meProp method."""
    sparse = ("meprop", "random", "mesimp")
    if cfg.sparse_attention and cfg.method not in sparse:
        raise ConfigError(
            f"sparse_attention puts meProp on the attention projections: it needs --method "
            f"meprop, random or mesimp, got {cfg.method}"
        )
    if cfg.d_model < 0 or cfg.d_model % N_HEAD:
        raise ConfigError(
            f"d_model must be a positive multiple of the {N_HEAD} attention heads, got "
            f"{cfg.d_model}: e.g. --d-model 128"
        )
    if cfg.fc_only and cfg.method not in sparse:
        raise ConfigError(
            f"fc_only keeps the lm task's mlp.proj dense: it needs --task lm and --method "
            f"meprop, random or mesimp, got task {cfg.task}, method {cfg.method}"
        )


def d_model_for(width: int) -> int:
    """The default ``d_model`` for a first MLP width: a quarter of it, a multiple of the
    heads (at least one per head)."""
    return max(N_HEAD, width // 4 // N_HEAD * N_HEAD)


def read_texts(path) -> list[str]:
    """The ``# text = ...`` sentences of a CoNLL-U file, in file order."""
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("# text = "):
                out.append(line[len("# text = ") :].rstrip("\r\n"))
    return out


def to_stream(texts: list[str]) -> torch.Tensor:
    """Sentences joined by newlines (one after each), as a (L,) int64 tensor of bytes."""
    data = "".join(t + "\n" for t in texts).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


class Attention(nn.Module):
    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=2)  # (B, T, d) each
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, nh, T, hs)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, d_ff)
        self.act = nn.GELU()
        self.proj = nn.Linear(d_ff, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, N_HEAD, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, d_ff, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class ByteLM(nn.Module):
    """``forward(x (B, T) bytes) -> logits (B, T, 256)``."""

    def __init__(
        self, d_model: int, widths: list[int], block_size: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if d_model < N_HEAD or d_model % N_HEAD:
            raise ValueError(f"d_model must be a positive multiple of {N_HEAD}, got {d_model}")
        self.block_size = block_size
        self.embed = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Embedding(block_size, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, w, dropout) for w in widths)
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB)

    def simplify_pairs(self) -> list[Pair]:
        return [
            Pair(f"blocks.{i}.mlp.fc", (f"blocks.{i}.mlp.proj",)) for i in range(len(self.blocks))
        ]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        h = self.drop(self.embed(x) + self.pos(torch.arange(t, device=x.device)))  # (B, T, d)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))


class LmTask:
    metric = "neg_bpb"
    block_size = 128  # bytes of context per window
    train_eval_windows = 64  # training windows scored at each evaluation (learning curves)
    eval_batch = 32
    sparse_attention = False  # meProp on the attention projections too (the config's default)

    def __init__(self, cfg, data_dir=None) -> None:
        if cfg.activation != "gelu":
            raise ValueError(
                f"the lm task's MLP has a fixed GELU activation, got activation="
                f"{cfg.activation!r}: leave --activation unset"
            )
        self.sparse_attention = bool(cfg.sparse_attention) or self.sparse_attention
        self.fc_only = bool(cfg.fc_only)
        texts = {
            split: read_texts(ensure_file(EWT_DATASET, EWT_SPLITS[split], data_dir))
            for split in ("train", "dev", "test")
        }
        if cfg.train_limit:
            texts["train"] = texts["train"][: cfg.train_limit]
        for split, t in texts.items():
            if not t:
                raise ValueError(f"the {split} file of UD English EWT holds no '# text' lines")
        self.streams = {split: to_stream(t) for split, t in texts.items()}
        # windows must fit the shortest stream (the tiny test fixtures)
        self.block = min(self.block_size, *(len(s) - 1 for s in self.streams.values()))
        train = self.streams["train"]
        n = min(self.train_eval_windows, (len(train) - 1) // self.block)
        self.streams["train_eval"] = train[: n * self.block + 1]

    def build_model(self, widths: list[int], cfg) -> ByteLM:
        d_model = getattr(cfg, "d_model", 0) or d_model_for(widths[0])
        return ByteLM(d_model, widths, self.block, cfg.dropout)

    def sparsify_filter(self, model):
        ends = (
            (".mlp.fc",)
            + (() if self.fc_only else (".mlp.proj",))
            + ((".attn.qkv", ".attn.out") if self.sparse_attention else ())
        )
        return lambda module, name: name.endswith(ends)

    def hidden_layers(self, model) -> list[nn.Module]:
        """The MLP projections (and the attention projections under ``sparse_attention``),
        whose backward is timed as ``hidden_backward``."""
        attn = (lambda b: (b.attn.qkv, b.attn.out)) if self.sparse_attention else lambda b: ()
        # both MLP projections even under fc_only (mlp.proj then dense), so that the column
        # times the same layers as dense's row does
        return [m for b in model.blocks for m in (*attn(b), b.mlp.fc, b.mlp.proj)]

    def widths(self, model) -> list[int]:
        return [b.mlp.fc.out_features for b in model.blocks]

    @staticmethod
    def dense_hidden(final_widths: dict[str, int]) -> tuple[int, ...]:
        """The MLP widths of a dense model the size of a meSimp'd one, block by block (its
        ``d_model``: ``dense_settings``)."""
        return tuple(final_widths.values())

    @staticmethod
    def dense_settings(cfg) -> dict:
        """The settings a dense model at a meSimp run's widths keeps from the run: its
        ``d_model``, which by default would follow the (shrunk) first MLP width."""
        return {"d_model": cfg.d_model or d_model_for(cfg.hidden[0])}

    def _windows(self, split: str) -> int:
        """Training windows per epoch: the same for every offset in [0, T)."""
        return (len(self.streams[split]) - self.block) // self.block

    def num_examples(self, split: str) -> int:
        return self._windows(split)

    def steps_per_epoch(self, batch_size: int) -> int:
        return -(-self._windows("train") // batch_size)

    def batches(self, split: str, batch_size: int, generator: torch.Generator):
        stream, t = self.streams[split], self.block
        n = self._windows(split)
        offset = int(torch.randint(t, (1,), generator=generator))
        starts = offset + torch.randperm(n, generator=generator) * t  # (n,)
        span = torch.arange(t + 1)
        for i in range(0, n, batch_size):
            rows = stream[starts[i : i + batch_size, None] + span]  # (B, T + 1)
            yield rows[:, :-1], rows[:, 1:]

    def loss(self, model, batch) -> torch.Tensor:
        x, y = batch
        logits = model(x)  # (B, T, 256)
        return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model, split: str) -> dict[str, float]:
        """Bits per byte over every byte of the split after the first (windows of T bytes,
        each predicted from its own window only)."""
        was_training = model.training
        model.eval()
        stream, t = self.streams[split], self.block
        n = -(-(len(stream) - 1) // t)  # windows covering the stream, the last one padded
        x = torch.zeros(n * t, dtype=torch.long)
        y = torch.full((n * t,), IGNORE, dtype=torch.long)
        x[: len(stream) - 1], y[: len(stream) - 1] = stream[:-1], stream[1:]
        x, y = x.view(n, t), y.view(n, t)
        total = 0.0
        for i in range(0, n, self.eval_batch):
            logits = model(x[i : i + self.eval_batch])
            total += float(
                F.cross_entropy(
                    logits.reshape(-1, VOCAB),
                    y[i : i + self.eval_batch].reshape(-1),
                    ignore_index=IGNORE,
                    reduction="sum",
                )
            )
        model.train(was_training)
        count = len(stream) - 1
        bpb = total / count / math.log(2)
        return {"neg_bpb": -bpb, "bpb": bpb, "loss": total / count}
