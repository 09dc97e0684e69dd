"""The parsing task: arc-standard oracle, features, batched decoding, scoring, training."""

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

import meprop
from meprop.config import MePropConfig, MeSimpConfig
from meprop.convert import sparsify_
from meprop.experiments.cli import main
from meprop.experiments.data import DATASETS, DataError, Sentence, load_ud_ewt, read_conllu
from meprop.experiments.data.download import Dataset, RemoteFile
from meprop.experiments.tasks.arcstandard import (
    LEFT,
    RIGHT,
    SHIFT,
    NonProjectiveError,
    State,
    Transitions,
    features,
    is_projective,
    oracle,
    oracle_examples,
)
from meprop.experiments.tasks.parse import ParserMLP, ParseTask, Vocab, attachment_scores, parse
from meprop.experiments.train import TrainConfig
from meprop.simplify import Simplifier

FIXTURE = Path(__file__).parent / "data" / "parse.conllu"
NAMES = ("en_ewt-ud-train.conllu", "en_ewt-ud-dev.conllu", "en_ewt-ud-test.conllu")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread avoids thread start-up and waits on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def replay(n: int, seq) -> State:
    state = State(n)
    for kind, label in seq:
        state.apply(kind, label)
    return state


def check_oracle(sentences, vocab_labels) -> tuple[int, int]:
    """Oracle each sentence; projective ones must come back exactly, the others raise."""
    ok = nonprojective = 0
    for s in sentences:
        labels = [vocab_labels.get(r, 0) for r in s.deprels]
        if not is_projective(s.heads):
            with pytest.raises(NonProjectiveError, match="not projective"):
                oracle(s.heads, labels)
            nonprojective += 1
            continue
        seq = oracle(s.heads, labels)
        assert len(seq) == 2 * len(s)
        state = replay(len(s), seq)
        assert state.terminal()
        assert state.heads[1:-1] == s.heads, s.sent_id
        assert state.labels[1:-1] == labels, s.sent_id
        ok += 1
    return ok, nonprojective


# --- transition system and oracle ------------------------------------------------------------


def test_oracle_reproduces_fixture_trees():
    sentences = read_conllu(FIXTURE)
    labels = {r: i for i, r in enumerate(sorted({r for s in sentences for r in s.deprels}))}
    assert check_oracle(sentences, labels) == (5, 1)


def test_oracle_reproduces_ewt_dev():
    try:
        dev = load_ud_ewt(splits=("dev",), download=False)["dev"]
    except DataError:
        pytest.skip("UD English EWT not found (set MEPROP_DATA)")
    labels = {r: i for i, r in enumerate(sorted({r for s in dev for r in s.deprels}))}
    ok, nonprojective = check_oracle(dev, labels)
    assert ok + nonprojective == len(dev) and ok > 0.95 * len(dev) and nonprojective > 0


def test_oracle_by_hand():
    # "Dogs bark loudly ." : bark is the root; Dogs, loudly and . depend on it
    seq = oracle([2, 0, 2, 2], [0, 1, 2, 3])
    assert seq == [
        (SHIFT, -1),
        (SHIFT, -1),
        (LEFT, 0),  # bark -> Dogs
        (SHIFT, -1),
        (RIGHT, 2),  # bark -> loudly
        (SHIFT, -1),
        (RIGHT, 3),  # bark -> .
        (RIGHT, 1),  # ROOT -> bark, once the buffer is empty
    ]


def test_projectivity():
    assert is_projective([0])
    assert is_projective([2, 0, 2, 2])
    assert not is_projective([3, 4, 0, 3])  # 1 <- 3 crosses 2 <- 4
    assert not is_projective([2, 0, 1])  # 1 -> 3 crosses ROOT -> 2
    # not trees: a cycle, a word its own head, no root, two roots, a head out of range, empty
    for heads in ([2, 1, 0], [1, 0], [2, 1], [0, 0], [0, 3], []):
        assert not is_projective(heads), heads


def test_legality():
    state = State(2)
    assert (state.can_shift(), state.can_left(), state.can_right()) == (True, False, False)
    state.apply(SHIFT, -1)
    # ROOT may take its dependent only when the buffer is empty
    assert (state.can_shift(), state.can_left(), state.can_right()) == (True, False, False)
    state.apply(SHIFT, -1)
    assert (state.can_shift(), state.can_left(), state.can_right()) == (False, True, True)
    state.apply(RIGHT, 0)
    assert (state.can_shift(), state.can_left(), state.can_right()) == (False, False, True)
    state.apply(RIGHT, 1)
    assert state.terminal() and state.heads[1:-1] == [0, 1]


def test_transition_ids():
    t = Transitions(["a", "b", "c"])
    assert len(t) == 7
    assert [t.id(SHIFT, -1), t.id(LEFT, 0), t.id(LEFT, 2), t.id(RIGHT, 0), t.id(RIGHT, 2)] == [
        0,
        1,
        3,
        4,
        6,
    ]
    assert t.kinds == [SHIFT, LEFT, LEFT, LEFT, RIGHT, RIGHT, RIGHT]
    assert t.labels == [-1, 0, 1, 2, 0, 1, 2]


# --- features ----------------------------------------------------------------------------------


def test_features_of_a_hand_worked_state():
    # 13 words. Build: 2 <- 1, 4 <- 3, 5 <- 4, 5 <- 2, 5 -> 6, 8 <- 7, 8 -> 9, 5 -> 8, 11 <- 10.
    # Arc labels: the dependent's number (label index d, feature id d + 1).
    seq = [(SHIFT, -1), (SHIFT, -1), (LEFT, 1), (SHIFT, -1), (SHIFT, -1), (LEFT, 3)]
    seq += [(SHIFT, -1), (LEFT, 4), (LEFT, 2), (SHIFT, -1), (RIGHT, 6), (SHIFT, -1)]
    seq += [(SHIFT, -1), (LEFT, 7), (SHIFT, -1), (RIGHT, 9), (RIGHT, 8), (SHIFT, -1)]
    seq += [(SHIFT, -1), (LEFT, 10)]
    state = replay(13, seq)
    assert state.stack == [0, 5, 11] and state.next == 12
    # s1 = 11: lc1 = 10. s2 = 5: lefts 4 then 2 (lc1 = 2, lc2 = 4), rights 6 then 8
    # (rc1 = 8, rc2 = 6), lc1(lc1) = lc1(2) = 1, rc1(rc1) = rc1(8) = 9. s3 = ROOT.
    words = [1] + [100 + i for i in range(1, 14)] + [0]  # ROOT id 1, word i -> 100 + i, NULL 0
    tags = [1] + [200 + i for i in range(1, 14)] + [0]
    f = features(state, words, tags)
    # positions: s3 s2 s1 b1 b2 b3 | s1: lc1 rc1 lc2 rc2 llc rrc | s2: lc1 rc1 lc2 rc2 llc rrc
    positions = [0, 5, 11, 12, 13, None, 10, None, None, None, None, None, 2, 8, 4, 6, 1, 9]
    assert f[:18] == [0 if p is None else (1 if p == 0 else 100 + p) for p in positions]
    assert f[18:36] == [0 if p is None else (1 if p == 0 else 200 + p) for p in positions]
    assert f[36:] == [11, 0, 0, 0, 0, 0, 3, 9, 5, 7, 2, 10]
    assert len(f) == 48


def test_initial_and_final_features():
    words, tags = [1, 7, 8, 0], [1, 17, 18, 0]
    state = State(2)
    assert (
        features(state, words, tags)
        == [0, 0, 1, 7, 8, 0]
        + [0] * 12
        + [
            0,
            0,
            1,
            17,
            18,
            0,
        ]
        + [0] * 12
        + [0] * 12
    )
    for kind, label in oracle([0, 1], [0, 1]):
        state.apply(kind, label)
    f = features(state, words, tags)
    assert f[:3] == [0, 0, 1] and f[6] == 0 and f[7] == 7  # ROOT's rightmost dependent: word 1


def test_oracle_examples_match_replay():
    s = read_conllu(FIXTURE)[0]
    t = Transitions(sorted(set(s.deprels)))
    labels = [t.index[r] for r in s.deprels]
    words, tags = list(range(1, len(s) + 2)) + [0], list(range(50, 51 + len(s))) + [0]
    feats, gold = oracle_examples(s.heads, labels, words, tags, t)
    state = State(len(s))
    for f, g in zip(feats, gold, strict=True):
        assert f == features(state, words, tags)
        state.apply(t.kinds[g], t.labels[g])
    assert state.heads[1:-1] == s.heads


# --- scoring -----------------------------------------------------------------------------------


def test_attachment_scores_by_hand():
    gold = [
        Sentence(
            forms=["Dogs", "bark", "loudly", "."],
            upos=["NOUN", "VERB", "ADV", "PUNCT"],
            xpos=["NNS", "VBP", "RB", "."],
            heads=[2, 0, 2, 2],
            deprels=["nsubj", "root", "advmod", "punct"],
        ),
        Sentence(
            forms=["Hi", "!"],
            upos=["INTJ", "PUNCT"],
            xpos=["UH", "."],
            heads=[0, 1],
            deprels=["root", "punct"],
        ),
    ]
    pred = [
        # Dogs: right head, wrong label; loudly: wrong head; the period: right
        ([2, 0, 1, 2], ["obj", "root", "advmod", "punct"]),
        # Hi: right; "!": wrong head, right label
        ([0, 0], ["root", "punct"]),
    ]
    scores = attachment_scores(gold, pred)
    # without punctuation: 4 words (Dogs, bark, loudly, Hi); heads right 3, labels too 2
    assert scores["uas"] == pytest.approx(3 / 4) and scores["las"] == pytest.approx(2 / 4)
    # with punctuation: 6 words; heads right 4 (+ "."), both right 3
    assert scores["uas_punct"] == pytest.approx(4 / 6)
    assert scores["las_punct"] == pytest.approx(3 / 6)
    assert attachment_scores(gold, [(s.heads, s.deprels) for s in gold]) == {
        "uas": 1.0,
        "las": 1.0,
        "uas_punct": 1.0,
        "las_punct": 1.0,
    }
    with pytest.raises(ValueError, match="2 gold sentences but 1 parses"):
        attachment_scores(gold, pred[:1])
    with pytest.raises(ValueError, match="has 2 words, its parse 1 heads"):
        attachment_scores(gold, [pred[0], ([0], ["root"])])


# --- decoding ----------------------------------------------------------------------------------


def random_sentences(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(1, 16)
        out.append(
            (
                [1] + [rng.randrange(3, 40) for _ in range(length)] + [0],
                [1] + [rng.randrange(3, 12) for _ in range(length)] + [0],
            )
        )
    return out


def is_tree(heads: list[int]) -> bool:
    """Every word reaches ROOT, and exactly one word hangs from it."""
    if sum(h == 0 for h in heads) != 1:
        return False
    for d in range(1, len(heads) + 1):
        seen = set()
        while d != 0:
            if d in seen:
                return False
            seen.add(d)
            d = heads[d - 1]
    return True


def test_batched_decoding_equals_one_at_a_time():
    t = Transitions(["a", "b", "c", "root"])
    model = ParserMLP(40, 12, 4, len(t), [32], emb_dim=8).double().eval()
    for emb in (model.words, model.tags, model.labels):
        torch.nn.init.normal_(emb.weight)  # varied scores: every kind of transition occurs
    sentences = random_sentences(24)
    one = [parse(model, [s], t)[0] for s in sentences]
    batched = parse(model, sentences, t, batch_size=16)
    assert batched == one
    assert parse(model, sentences, t, batch_size=1000) == one
    kinds = set()
    for (words, _), (heads, labels) in zip(sentences, batched, strict=True):
        assert len(heads) == len(labels) == len(words) - 2
        assert is_tree(heads) and is_projective(heads)
        assert all(0 <= lab < 4 for lab in labels)
        kinds |= set(labels)
    assert len(kinds) > 1  # the random model does use several labels


# --- the task end to end -------------------------------------------------------------------------


@pytest.fixture
def parse_root(tmp_path, monkeypatch):
    """A data root whose EWT splits are all the parse fixture, with registered checksums."""
    folder = tmp_path / "data" / "ud_english_ewt"
    folder.mkdir(parents=True)
    blob = FIXTURE.read_bytes()
    for name in NAMES:
        shutil.copy(FIXTURE, folder / name)
    files = {name: RemoteFile(hashlib.sha256(blob).hexdigest(), len(blob)) for name in NAMES}
    monkeypatch.setitem(
        DATASETS, "ud_english_ewt", Dataset("ud_english_ewt", "http://127.0.0.1:9/", files)
    )
    return folder.parent


def test_task_skips_nonprojective_training_sentences(parse_root):
    task = ParseTask(TrainConfig(task="parse", hidden=(16,)), parse_root)
    sentences = read_conllu(FIXTURE)
    projective = [s for s in sentences if is_projective(s.heads)]
    assert task.data.skipped == 1
    assert len(task.data.gold) == 2 * sum(len(s) for s in projective)
    assert task.data.feats.shape == (len(task.data.gold), 48)
    # the non-projective sentence is still parsed and scored on dev
    model = task.build_model([16], TrainConfig(task="parse"))
    parsed = task.parse(model, sentences)
    assert [len(h) for h, _ in parsed] == [len(s) for s in sentences]
    scores = task.evaluate(model, "dev")
    assert {"uas", "las", "uas_punct", "las_punct", "sents_per_s"} <= set(scores)
    assert 0.0 <= scores["las"] <= scores["uas"] <= 1.0


def test_vocab():
    sentences = read_conllu(FIXTURE)
    vocab = Vocab(sentences)
    words, tags = vocab.encode(sentences[0])
    assert words[0] == 1 and words[-1] == 0 and tags[0] == 1 and tags[-1] == 0
    assert vocab.words[words[1]] == "the"  # "The" and "the": seen 7 times, lowercased
    assert vocab.words[words[3]] == "<unk>"  # "sat" once: unknown, no shape class applies
    assert "." in vocab.tags and "NN" in vocab.tags
    upos = Vocab(sentences, tags="upos")
    assert "NOUN" in upos.tags and "NN" not in upos.tags
    unseen = Sentence(["Zork"], ["X"], ["ZZ"], [0], ["root"])
    w, t = vocab.encode(unseen)
    assert vocab.words[w[1]] == "<unk:cap>" and vocab.tags[t[1]] == "<unk>"
    with pytest.raises(ValueError, match="tags must be 'xpos' or 'upos', got 'feats'"):
        Vocab(sentences, tags="feats")


def train(root, out, *extra):
    args = ["train", "parse", "--data-dir", str(root), "--out", str(out), "--no-progress"]
    return main([*args, "--hidden", "24", "--batch-size", "8", *extra])


@pytest.mark.parametrize(
    "method,extra",
    [
        ("dense", []),
        ("meprop", ["--k", "4"]),
        ("meprop", ["--k", "4", "--mode", "unified"]),
        ("random", ["--k", "4"]),
        ("kdim", ["--k", "4"]),
        ("mesimp", ["--k", "4", "--prune-interval", "2", "--prune-rate", "0.3"]),
    ],
)
def test_train_each_method(parse_root, tmp_path, method, extra):
    out = tmp_path / "run"
    assert train(parse_root, out, "--method", method, "--epochs", "2", *extra) == 0
    summary = json.loads((out / "summary.json").read_text())
    n_examples = 2 * sum(len(s) for s in read_conllu(FIXTURE) if is_projective(s.heads))
    assert summary["steps"] == 2 * -(-n_examples // 8)
    assert summary["metric"] == "uas"
    for key in ("test_uas", "test_las", "test_uas_punct", "test_las_punct"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["test_sents_per_s"] > 0
    assert summary["times"]["hidden_backward"] > 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and "dev_las" in log[0] and "train_uas" in log[0]
    if method == "kdim":
        assert summary["widths"] == [4]
    if method == "mesimp":
        assert summary["final_widths"]["mlp.0"] < 24


def test_parser_learns_the_fixture(parse_root, tmp_path):
    out = tmp_path / "run"
    train(parse_root, out, "--method", "meprop", "--k", "8", "--epochs", "25")
    cfg = TrainConfig.from_dict(json.loads((out / "config.json").read_text()))
    task = ParseTask(cfg, parse_root)
    model = task.build_model(cfg.widths(), cfg)
    meprop.load(out / "best.pt", model, restore_rng=False)
    sentences = read_conllu(FIXTURE)
    # dev = train here: the projective sentences come back exactly, labels included
    for s, (heads, rels) in zip(sentences, task.parse(model, sentences), strict=True):
        if is_projective(s.heads):
            assert (heads, rels) == (s.heads, s.deprels), s.sent_id
        else:  # a projective tree, so it misses at least one of the crossing arcs
            assert heads != s.heads and is_projective(heads)


def test_simplified_checkpoint_reloads(parse_root, tmp_path):
    cfg = TrainConfig(task="parse", method="mesimp", k=4, hidden=(24,))
    task = ParseTask(cfg, parse_root)
    model = task.build_model(cfg.widths(), cfg)
    sparsify_(model, cfg.meprop_config(), filter_fn=task.sparsify_filter(model))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    simp = Simplifier(model, MeSimpConfig(prune_rate=0.3, interval=3), opt)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        for batch in task.batches("train", 8, gen):
            task.loss(model, batch).backward()
            opt.step()
            opt.zero_grad()
            simp.step()
    width = simp.sizes()["mlp.0"]
    assert width < 24 and model.mlp[-1].in_features == width
    meprop.save(tmp_path / "ckpt.pt", model, opt, simplifier=simp)

    fresh = task.build_model(cfg.widths(), cfg)  # full size, dense
    meprop.load(tmp_path / "ckpt.pt", fresh, restore_rng=False)
    assert task.widths(fresh) == [width]
    model.eval()
    fresh.eval()
    feats = task.data.feats[:20].long()
    assert torch.equal(model(feats), fresh(feats))
    sentences = read_conllu(FIXTURE)
    assert task.parse(model, sentences) == task.parse(fresh, sentences)


def test_sparsify_filter_leaves_the_output_layer_dense(parse_root):
    cfg = TrainConfig(task="parse", hidden=(24,), layers=2)
    task = ParseTask(cfg, parse_root)
    model = task.build_model(cfg.widths(), cfg)
    sparsify_(model, MePropConfig(k=4), filter_fn=task.sparsify_filter(model))
    kinds = [type(m).__name__ for m in model.mlp if isinstance(m, torch.nn.Linear)]
    assert kinds == ["SparseLinear", "SparseLinear", "Linear"]
    assert task.widths(model) == [24, 24]
    assert task.dense_hidden({"mlp.0": 7, "mlp.3": 5}) == (7, 5)


def test_parse_grid():
    from meprop.experiments.reproduce import GRIDS, PAPER

    for quick in (True, False):
        rows = GRIDS["parse"](quick=quick, dataset="")
        methods = {(r.config.method, r.config.mode, r.config.optimizer) for r in rows}
        assert ("dense", "per_example", "adam") in methods
        assert {("meprop", "per_example", "adam"), ("meprop", "unified", "adam")} <= methods
        assert {m for m, _, _ in methods} == {"dense", "meprop", "random", "kdim", "mesimp"}
        assert ("dense", "per_example", "adagrad") in methods
        assert all(r.config.task == "parse" for r in rows)
        assert len({r.name for r in rows}) == len(rows)
        # the lr x dropout grid for dense; its lr 1e-3 (0: Adam's default), dropout 0.5 cell
        # is the main dense row's run
        tuning = {(r.config.lr, r.config.dropout) for r in rows if r.group == "tuning"}
        main = next(r for r in rows if r.group == "main" and r.config.method == "dense")
        assert tuning | {(main.config.lr, main.config.dropout)} == {
            (lr, d) for lr in (5e-4, 0.0, 2e-3) for d in (0.25, 0.5)
        }
        assert len(tuning) == 5
    assert "dense" in PAPER["parse"]


def test_reproduce_parse_and_report(parse_root, tmp_path, monkeypatch):
    from dataclasses import replace

    from meprop.experiments import reproduce

    full_grid = reproduce.parse_grid

    def grid(quick, dataset):
        rows = [r for r in full_grid(quick=True) if r.config.optimizer == "adam"]
        rows = [r for r in rows if r.config.method in ("dense", "meprop", "mesimp")]
        small = dict(epochs=2, batch_size=8, hidden=(24,), k=4, train_limit=0, prune_interval=2)
        return [replace(r, config=replace(r.config, **small, prune_rate=0.3)) for r in rows]

    monkeypatch.setattr(reproduce, "parse_grid", grid)
    monkeypatch.setitem(reproduce.GRIDS, "parse", grid)
    out = tmp_path / "results"
    args = ["reproduce", "parse", "--quick", "--out", str(out), "--data-dir", str(parse_root)]
    assert main([*args, "--no-progress"]) == 0
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert any(r.startswith("dense-size-of-mesimp") for r in runs)  # the size control ran
    report = (out / "report.md").read_text()
    assert "test uas %" in report and "| dense |" in report and "meSimp" in report
    assert "parsing on the Penn Treebank" in report  # the published figures beside ours
