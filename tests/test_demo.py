"""The main demo at reduced size: each loss drop gets its own stage, λ̂ steps up with every
mode learned, and the final λ̂ matches Aoyagi's λ for the teacher's rank.

Two seeds, each a full run (train, Orbax checkpoints, λ̂ at 29 checkpoints, stages) with
the demo's model and sampler but fewer checkpoints and draws than ``slt-jax demo``.
"""

import numpy as np
import pytest

from slt_jax.demos import dln_trajectory

REDUCED = dict(num_log=28, num_linear=0,
               sampler=dict(num_chains=8, num_burnin=1000, num_draws=1000, chunk_size=100))


@pytest.fixture(scope="module", params=[0, 1], ids=["seed0", "seed1"])
def demo(request, tmp_path_factory):
    out = dln_trajectory.run(tmp_path_factory.mktemp(f"demo{request.param}"), seed=request.param,
                             progress=False, **REDUCED)
    print(dln_trajectory.report(out))
    return out


def test_each_loss_drop_lies_in_its_own_stage(demo):
    stages, drops = demo["stages"], demo["drops"]
    assert len(drops) == len(dln_trajectory.SINGULAR_VALUES) and min(drops) > 0
    index = [stages.stage_of(drop) for drop in drops]
    # Strictly between two consecutive boundaries: neither before the first nor after the last.
    assert all(0 < i < len(stages.boundaries) for i in index), (drops, stages.boundaries)
    assert len(set(index)) == len(index), (drops, stages.boundaries)


def test_llc_steps_up_with_each_mode_learned(demo):
    curve, (first, second) = demo["curve"], demo["drops"]
    steps, llc = curve.steps[curve.healthy], curve.column("llc_mean")[curve.healthy]
    se = curve.column("llc_se")[curve.healthy]
    before, between, after = steps < first, (steps > first) & (steps < second), steps > second
    # Before the first drop the network sits at the origin, where no direction is stiff: λ̂ ≤ 0
    # up to its noise (the saddle pulls chains slightly downhill).
    assert llc[before].max() < 1.0, llc[before]
    # After it, at the rank-1 saddle, the stiff directions are those of 5×5 rank-1 matrices:
    # 9 → λ̂ ≈ 4.5. Tolerance: 4 standard errors of the plateau mean (from the rows' own s.e.)
    # plus 10 % for the finite-γ and minibatch-noise biases at a saddle (docs/mathematics.md §6.4).
    mean_se = np.sqrt(np.sum(se[between] ** 2)) / between.sum()
    assert abs(llc[between].mean() - 4.5) < 4 * mean_se + 0.45, llc[between]
    assert llc[before].max() < llc[between].min() and llc[between].max() < llc[after].min()


def test_final_llc_is_within_15_percent_of_aoyagi(demo):
    lam = demo["lambda"]
    final = demo["curve"].rows[-1]
    assert lam == 8.0
    # The 15 %: at γ = 300 the weakest learned directions lose ≈ 4 % (measured), and
    # with 8 chains the standard error is 4–9 % of λ (measured over 5 seeds): below 10 % the 15 %
    # check is a real test of the estimate, not of its noise.
    assert final["llc_se"] < 0.1 * lam
    assert abs(final["llc_mean"] - lam) < 0.15 * lam, final


def test_outputs_are_written(demo):
    paths = demo["paths"]
    assert set(paths) == {"csv", "json", "plot", "early_warning"}
    for kind in ("plot", "early_warning"):
        assert paths[kind].read_bytes()[:4] == b"\x89PNG"
    assert len(paths["csv"].read_text().splitlines()) == len(demo["curve"].rows) + 1
    # The susceptibility toward the teacher's second mode rides on the same chains: one per row.
    chi = demo["curve"].column(dln_trajectory.CHI_COLUMN)
    assert np.all(np.isfinite(chi)) and np.all(demo["curve"].column(dln_trajectory.CHI_COLUMN + "_se") > 0)


@pytest.mark.slow
def test_grokking_llc_rises_while_memorising_and_falls_while_generalising(tmp_path):
    from slt_jax.demos import grokking

    out = grokking.run(tmp_path, num_steps=1500, num_log=10, num_linear=0,
                       sampler=dict(num_burnin=300, num_draws=300), progress=False)
    print(grokking.report(out))
    curve = out["curve"]
    assert 0 < out["memorised"] < out["generalised"]
    llc, se = curve.column("llc_mean"), curve.column("llc_se")
    peak = int(np.nanargmax(llc))
    assert 0 < peak < len(llc) - 1 and curve.steps[peak] <= out["generalised"]
    # Rise and fall, each by more than 4 standard errors of the difference.
    for end in (0, len(llc) - 1):
        assert llc[peak] - llc[end] > 4 * np.hypot(se[peak], se[end]), (llc, se)
