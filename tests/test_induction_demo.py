"""The induction example: the copy task, the loss drop, and the demo end to end.

The default suite runs the demo at reduced size (300 training steps, short chains): every file is
written and the report names the drop, the boundaries and a head. The full demo on two seeds — the
loss drop within ±0.15 decades of a stage boundary of the λ̂ curve — is marked slow (about 5 minutes
a seed on 2 CPU cores).
"""

import math

import jax
import numpy as np
import pytest

from slt_jax.demos import induction


@pytest.mark.unit
def test_the_copy_task_repeats_one_segment_and_scores_what_only_copying_predicts():
    batch = induction.copy_task(jax.random.key(0), 256)
    tokens, mask = np.asarray(batch["tokens"]), np.asarray(batch["mask"])
    assert tokens.shape == mask.shape == (256, induction.LENGTH) and tokens.dtype == np.int32
    assert np.all(mask.sum(axis=1) == induction.SEGMENT - 1)  # the copy's tokens after its first
    for row, scored in zip(tokens, mask):
        positions = np.flatnonzero(scored)
        b = positions[0] - 1  # the second occurrence starts one before its first scored token
        segment = row[b:b + induction.SEGMENT]
        starts = [a for a in range(b - induction.SEGMENT + 1) if np.array_equal(row[a:a + induction.SEGMENT], segment)]
        assert starts, "the scored segment has an earlier occurrence to copy from"


@pytest.mark.unit
def test_the_drop_is_the_midpoint_crossing_in_log_steps():
    steps = np.unique(np.round(np.logspace(1, 3.5, 80)))
    losses = 4.0 - 3.6 / (1 + np.exp(-(np.log10(steps) - 3.0) / 0.03))  # midpoint at step 1000
    drop = induction.loss_drop(steps, losses)
    assert drop["plateau"] == pytest.approx(4.0, abs=1e-3) and drop["final"] == pytest.approx(0.4, abs=1e-3)
    assert math.log10(drop["step"]) == pytest.approx(3.0, abs=0.01)
    assert 0.05 < drop["width_decades"] < 0.12  # 20→80 % of a logistic of scale 0.03: 2·0.03·ln 4 ≈ 0.083


def test_the_reduced_demo_writes_its_curves_and_report(tmp_path):
    out = induction.run(tmp_path, seed=0, num_steps=300, progress=False,
                        sampler=dict(num_chains=2, num_burnin=20, num_draws=20))
    paths = out["paths"]
    for kind in ("csv", "json", "plot", "heads_csv", "heads_plot", "report"):
        assert paths[kind].stat().st_size > 0, kind
    assert set(out["curves"].curves) == {"all", "L0H0", "L0H1", "L1H0", "L1H1"}
    assert out["most_changed"] in (None, *induction.HEADS)  # 300 steps: the drop may not have come yet
    # Every head's χ to both probe sets at the last checkpoint (and before the drop, if it came).
    last = str(int(out["curves"].curves["all"].steps[-1]))
    chi = out["susceptibilities"][last]
    assert chi["components"] == list(induction.HEADS) and chi["shifts"] == ["repeated segment", "no repeat"]
    assert np.all(np.isfinite(chi["chi"])) and np.all(np.asarray(chi["se"]) > 0)
    text = induction.report(out)
    assert "held-out induction loss" in text and "stage boundar" in text and "susceptibility χ per head" in text


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_the_loss_drop_lies_within_015_decades_of_a_stage_boundary(seed, tmp_path):
    out = induction.run(tmp_path, seed=seed, progress=False)
    print(induction.report(out))
    assert out["drop"]["final"] < 0.2 * out["drop"]["plateau"]  # an abrupt, complete drop
    assert out["nearest_distance_decades"] is not None and abs(out["nearest_distance_decades"]) <= 0.15
