"""The report's "Did dev stop improving?" table: the dev slope over the last epochs, over seeds."""

from pathlib import Path

import pytest

from meprop.experiments.convergence import convergence_section, dev_slope
from meprop.experiments.runs import Run


def run(devs, seed=1, label="row", metric="accuracy", best=None):
    """A run whose log has one dev evaluation per epoch (``devs[i]`` after epoch i + 1)."""
    log = [{"epoch": i + 1.0, f"dev_{metric}": d} for i, d in enumerate(devs)]
    summary = {"metric": metric, "best_epoch": best or len(devs)}
    return Run(Path(f"r{seed}"), {"seed": seed}, summary, log, "main", label, {"seed": seed})


def test_the_slope_is_least_squares_over_the_last_epochs():
    # 0.1 point per epoch over the last 4 evaluations (epochs 7-10), whatever came before
    devs = [0.5, 0.9, 0.1, 0.8, 0.2, 0.7] + [0.90 + 0.001 * i for i in range(4)]
    assert dev_slope(run(devs)) == pytest.approx(0.1)
    assert dev_slope(run([0.9] * 4)) is None  # too short: its last epochs are the start
    # a loss (bits per byte) is shown as itself: falling is improving
    assert dev_slope(run([-3.0, -2.9, -2.8, -2.7, -2.6], metric="neg_bpb")) == pytest.approx(-0.1)


def table(section):
    return {line.split(" | ")[0][2:]: line for line in section if line.startswith("| ") and
            not line.startswith("| run") and not line.startswith("| ---")}  # fmt: skip


def test_rows_that_rise_on_every_seed_are_still_improving_and_noisy_ones_are_not():
    rising = [run([0.8 + 0.01 * i + 0.001 * s for i in range(10)], s, "rising") for s in (1, 2, 3)]
    noise = [[0.90, 0.92, 0.91, 0.93], [0.93, 0.90, 0.92, 0.91], [0.91, 0.91, 0.90, 0.92]]
    flat = [run([0.9] * 6 + n, s, "flat") for s, n in zip((1, 2, 3), noise, strict=True)]
    falling = [
        run([0.9 - 0.005 * i * (1 + 0.1 * s) for i in range(8)], s, "falling") for s in (1, 2, 3)
    ]
    one = [run([0.8 + 0.01 * i for i in range(10)], 1, "one seed")]
    rows = table(convergence_section(rising + flat + falling + one))
    assert rows["rising"].endswith("| +1.00 [+1.00, +1.00] | still improving |"), rows["rising"]
    assert rows["flat"].endswith("| no clear trend |")
    assert rows["falling"].endswith("| getting worse |")
    assert "one seed" not in rows  # no interval from one seed
    assert convergence_section(one) == []


def test_a_falling_loss_is_improving():
    runs = [run([-3.0 + 0.1 * i + 0.01 * s for i in range(6)], s, "lm", "neg_bpb") for s in (1, 2)]
    (line,) = table(convergence_section(runs)).values()
    assert "| -0.100 [" in line and line.endswith("| still improving |")
    assert "bits per byte per epoch" in "\n".join(convergence_section(runs))


def test_rows_of_one_label_in_two_groups_are_named_by_group():
    runs = [run([0.9] * 6, s, "dense") for s in (1, 2)]
    other = [run([0.8] * 6, s, "dense") for s in (1, 2)]
    for r in other:
        r.group = "resnet"
    rows = table(convergence_section(runs + other))
    assert set(rows) == {"main: dense", "resnet: dense"}
