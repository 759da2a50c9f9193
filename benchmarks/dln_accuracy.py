"""How accurate is λ̂? Random deep linear networks against Aoyagi's exact learning coefficient.

The protocol of Furman & Lau, *Estimating the Local Learning Coefficient at Scale*
(arXiv:2402.03698; docs/mathematics.md §5.1 table), with the step size chosen by
``estimate_llc(step_size="auto")`` instead of by hand:

  * architecture (``slt_jax.models.random_dln``): depth L ~ U{range}, each width ~ U{range};
    each true layer's rank is cut with probability 0.5; r = the product's rank;
  * w* (``dln_teacher(kind="aligned")``): every layer of rank exactly r with aligned images,
    the most singular true parameter, where the *local* λ equals Aoyagi's global λ. (Random
    rank cuts alone can put w* on a smaller component of the fibre whose local λ is larger —
    docs/mathematics.md §5.3 "Local vs global"; that variant is not run here.) For r = 0 w* = 0;
  * data: x ~ U(−10, 10), noise-free outputs y = W_L ⋯ W_1 x (w* is an exact minimum); the
    loss is the Gaussian negative log-likelihood with σ = 1 (the MSE up to a constant);
  * sampler: SGLD, γ = 1, nβ = n / log n, batch 500, the step size calibrated per network
    (``slt_jax.tuning.sweep``: 4 step sizes × 4 chains, compared at equal simulated time),
    then ``--chains`` chains with burn-in and draws set by the calibration (at least
    ``--burnin`` and ``--draws``), the burn-in read off the chains' own λ̂ trace and the run
    doubled while λ̂ still trends, up to 8× — or while it still reads the Laplace value of w*
    (``settings["equilibration"]["laplace"]``), up to 64× (``slt_jax.tuning.equilibration``; the
    row records the steps run, the doublings and whether the run sat on that plateau);
    when the run ends, the largest Hessian eigenvalue at the chains is measured and, where the
    step exceeds the grid's rule 1/(nβh + γ) there, the same chains continue at a halved step
    (the ε column then reads "final (from calibrated)"; ``stiffness`` in the row);
  * ground truth: ``dln_learning_coefficient(widths, r)``; multiplicity m > 1 adds a
    negative finite-n correction of order (m − 1)/log(nβ) (docs/mathematics.md §6.2), so the table
    also reports the m = 1 networks on their own, and the networks whose estimate found λ̂
    equilibrated (``settings["equilibration"]["equilibrated"]``; the others carry a
    ``CalibrationWarning``: at deep, highly singular points λ̂ can sit on a plateau and then
    climb on a time scale beyond even the extended run).

Scales (``--scales``; "1K" and "10K" are the CPU defaults, the larger ones for a GPU):

    scale  depth   widths      n
    1K     2–5     5–50        1e5
    10K    2–10    5–100       1e5
    100K   2–10    50–500      1e6
    1M     2–20    100–1000    1e6

Run::

    python benchmarks/dln_accuracy.py                       # 1K and 10K, CPU defaults
    python benchmarks/dln_accuracy.py --scales 100K 1M --networks 20 20 --n 1000000   # GPU

It prints a table per network and a summary (relative error: median, 90th percentile, worst;
R² and slope of λ̂ against λ; wall time), writes ``benchmarks/results/dln_accuracy.json`` and
a scatter plot ``dln_accuracy.png`` beside it. Targets: median relative error ≤ 5 %, worst
≤ 15 %. The CPU defaults (8 networks at 1K, 3 at 10K) took 38 minutes on two cores, 14 of
them the 8-layer network whose run sat on its Laplace value, was extended 64× and then
continued at an eighth of its step (the stiffness check), 14 the 6-layer network
25-15-21-8-35-14 that climbed to the 8× cap (408k steps).
"""

import argparse
import functools
import json
import os
import platform
import time
import warnings
from pathlib import Path

import jax
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import slt_jax
from slt_jax.errors import CalibrationError
from slt_jax.groundtruth import dln_learning_coefficient
from slt_jax.models.dln import dln_data, dln_loss, dln_teacher, random_dln

SCALES = {
    "1K": dict(depth_range=(2, 5), width_range=(5, 50)),
    "10K": dict(depth_range=(2, 10), width_range=(5, 100)),
    "100K": dict(depth_range=(2, 10), width_range=(50, 500)),
    "1M": dict(depth_range=(2, 20), width_range=(100, 1000)),
}
DEFAULT_NETWORKS = {"1K": 8, "10K": 3, "100K": 10, "1M": 5}
LOCALIZATION = 1.0
BATCH_SIZE = 500
INPUT_SCALE = 10.0
# A row is flagged "plateau" when λ̂ lies within PLATEAU_GAP_REL of the Laplace value and that
# value is below PLATEAU_GAP·λ (so the two can be told apart).
PLATEAU_GAP, PLATEAU_GAP_REL = 0.9, 0.05
_LOSS = functools.partial(dln_loss, sigma=1.0)  # one object: networks of equal shapes share programs


def run_network(key, scale: str, n: int, chains: int, burnin: int, draws: int) -> dict:
    """One random network of ``scale``: build it, estimate λ̂ with the calibrated step size.

    Returns:
      A JSON-ready row: architecture, λ and multiplicity, λ̂ ± se, relative error, the chosen
      step size and why, wall time.
    """
    key_arch, key_teacher, key_data, key_sample = jax.random.split(key, 4)
    arch = random_dln(key_arch, **SCALES[scale])
    teacher = dln_teacher(key_teacher, arch.widths, arch.rank, kind="aligned")
    data = dln_data(key_data, teacher, n, input_scale=INPUT_SCALE, input_dist="uniform")
    truth = dln_learning_coefficient(arch.widths, arch.rank)
    lam = float(truth.lam)
    # The Laplace value at the aligned point: r·(H_0 + H_L − r) stiff directions, each ≈ ½
    # (slt_jax.estimators.laplace; tests/test_laplace.py checks it against the dense Hessian). λ̂ near it,
    # below λ, is the plateau of chains that have not left the quadratic part.
    laplace = arch.rank * (arch.widths[0] + arch.widths[-1] - arch.rank) / 2
    row = {"scale": scale, "widths": list(arch.widths), "rank": arch.rank,
           "num_params": sum(a * b for a, b in zip(arch.widths, arch.widths[1:])),
           "lambda": lam, "multiplicity": truth.multiplicity, "laplace": laplace}
    start = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = slt_jax.estimate_llc(_LOSS, teacher, data, key_sample, step_size="auto",
                                          localization=LOCALIZATION, batch_size=BATCH_SIZE,
                                          num_chains=chains, num_burnin=burnin, num_draws=draws,
                                          progress=False)
    except CalibrationError as error:
        row.update(llc_mean=None, llc_se=None, rel_error=None, step_size=None,
                   reason=str(error).splitlines()[0], seconds=time.perf_counter() - start)
        return row
    calibration = result.settings["calibration"]
    row.update(
        llc_mean=result.llc_mean, llc_se=result.llc_se, rel_error=result.llc_mean / lam - 1,
        step_size=result.settings["step_size"], num_burnin=result.settings["num_burnin"],
        num_draws=result.settings["num_draws"], diverged_chains=len(result.diverged_chains),
        calibration_status=[r["status"] for r in calibration["table"]],
        calibration_steps=[r["step_size"] for r in calibration["table"]],
        equilibrated=result.settings["equilibration"]["equilibrated"],
        calibration_equilibrated=calibration["equilibrated"], num_steps=result.settings["equilibration"]["num_steps"],
        extensions=result.settings["equilibration"]["extensions"], reason=calibration["reason"],
        warnings=sorted({type(w.message).__name__ for w in caught}), seconds=time.perf_counter() - start,
        plateau=bool(laplace < PLATEAU_GAP * lam and abs(result.llc_mean / laplace - 1) < PLATEAU_GAP_REL),
        # What estimate_llc itself saw: its own Laplace value (dense or stochastic Lanczos) and
        # whether the run sat on it (then extended up to max_plateau_extension).
        laplace_estimate=result.settings["equilibration"]["laplace"],
        plateau_seen=result.settings["equilibration"]["plateau"],
        still_at_plateau=result.settings["equilibration"]["still_at_plateau"],
        stiffness=result.settings["equilibration"]["stiffness"],
    )
    return row


def summarise(rows) -> dict:
    """Relative-error quantiles, and R² and slope of the least-squares line λ̂ = a·λ + b."""
    done = [r for r in rows if r["llc_mean"] is not None]
    out = {"networks": len(rows), "failed_calibrations": len(rows) - len(done)}
    if not done:
        return out
    err = np.abs([r["rel_error"] for r in done])
    lam = np.array([r["lambda"] for r in done])
    est = np.array([r["llc_mean"] for r in done])
    out.update(median_rel_error=float(np.median(err)), p90_rel_error=float(np.quantile(err, 0.9)),
               worst_rel_error=float(err.max()), mean_signed_rel_error=float(np.mean([r["rel_error"] for r in done])))
    if len(done) >= 2 and np.ptp(lam) > 0:
        slope, intercept = np.polyfit(lam, est, 1)
        residual = est - (slope * lam + intercept)
        out.update(slope=float(slope), intercept=float(intercept),
                   r2=float(1 - np.sum(residual**2) / np.sum((est - est.mean()) ** 2)))
    return out


def scatter(rows, path):
    """λ̂ against λ (log-log), one colour per scale, the identity and ±15 % dashed."""
    fig = Figure(figsize=(5.5, 5.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    done = [r for r in rows if r["llc_mean"] is not None]
    for i, scale in enumerate(dict.fromkeys(r["scale"] for r in done)):
        group = [r for r in done if r["scale"] == scale]
        ax.errorbar([r["lambda"] for r in group], [r["llc_mean"] for r in group],
                    yerr=[2 * r["llc_se"] for r in group], fmt="o", color=f"C{i}", label=scale, capsize=2)
    lam = np.array([r["lambda"] for r in done] or [1.0])
    line = np.geomspace(max(lam.min() / 1.5, 1e-2), lam.max() * 1.5, 10)
    ax.plot(line, line, color="0.3", linewidth=0.8, label="λ̂ = λ")
    for factor in (0.85, 1.15):
        ax.plot(line, factor * line, color="0.6", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("Aoyagi's λ")
    ax.set_ylabel(r"$\hat\lambda$ (step_size='auto')")
    ax.set_title("Random deep linear networks (±15 % dashed)", fontsize="medium")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


def _pct(x):
    return "—" if x is None else f"{100 * x:+.1f} %"


MEDIAN_TARGET, WORST_M1_TARGET = 0.03, 0.10
"""Issue 16's targets: median relative error ≤ 3 % over all networks, worst ≤ 10 % at multiplicity 1."""


def target_check(summary) -> dict:
    """Each target, met or missed, as printed lines and as ``{name: bool | None}`` for the JSON."""
    median = summary["all"].get("median_rel_error")
    worst = summary["multiplicity_1"].get("worst_rel_error")
    verdict = lambda value, limit: None if value is None else bool(value <= limit)
    met = {"median_le_3pct": verdict(median, MEDIAN_TARGET),
           "worst_multiplicity_1_le_10pct": verdict(worst, WORST_M1_TARGET)}
    word = {True: "met", False: "MISSED", None: "not measured"}
    pct = lambda x: "—" if x is None else f"{100 * x:.1f} %"
    return {"met": met, "lines": [
        f"target median |rel. error| ≤ {100 * MEDIAN_TARGET:.0f} % (all networks): {pct(median)}, "
        f"{word[met['median_le_3pct']]}",
        f"target worst |rel. error| ≤ {100 * WORST_M1_TARGET:.0f} % at multiplicity 1 (multiplicity > 1 reported "
        f"apart, above): {pct(worst)}, {word[met['worst_multiplicity_1_le_10pct']]}"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scales", nargs="+", default=["1K", "10K"], choices=sorted(SCALES))
    parser.add_argument("--networks", nargs="+", type=int, default=None,
                        help="networks per scale (default: 8 at 1K, 3 at 10K, 10 at 100K, 5 at 1M)")
    parser.add_argument("--n", type=int, default=100_000, help="samples per dataset (protocol: 1e5, 1e6 above 10K)")
    parser.add_argument("--chains", type=int, default=4, help="chains of the final estimate")
    parser.add_argument("--burnin", type=int, default=500, help="minimum burn-in steps of the final estimate")
    parser.add_argument("--draws", type=int, default=1000, help="minimum draws of the final estimate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/dln_accuracy.json")
    args = parser.parse_args(argv)
    counts = args.networks or [DEFAULT_NETWORKS[s] for s in args.scales]
    if len(counts) != len(args.scales):
        parser.error("--networks needs one count per scale")

    start = time.perf_counter()
    rows = []
    print("| scale | widths | r | d | λ (m) | Laplace | λ̂ ± se | rel. error | ε | steps (doublings) | equilibrated | "
          "plateau seen | reads plateau | time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s, (scale, count) in enumerate(zip(args.scales, counts)):
        for i in range(count):
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(args.seed), s), i)
            row = run_network(key, scale, args.n, args.chains, args.burnin, args.draws)
            rows.append(row)
            est = "calibration failed" if row["llc_mean"] is None else f"{row['llc_mean']:.4g} ± {row['llc_se']:.2g}"
            eps = "—" if row["step_size"] is None else f"{row['step_size']:.2g}"
            if row.get("stiffness") and row["stiffness"][0]["step_size"] != row["step_size"]:
                eps += f" (from {row['stiffness'][0]['step_size']:.2g})"  # continued at a smaller step
            print(f"| {scale} | {'-'.join(map(str, row['widths']))} | {row['rank']} | {row['num_params']} | "
                  f"{row['lambda']:g} ({row['multiplicity']}) | {row['laplace']:g} | {est} | {_pct(row['rel_error'])} | "
                  f"{eps} | {row.get('num_steps', '—')} ({row.get('extensions', '—')}) | "
                  f"{'yes' if row.get('equilibrated') else 'no'} | {'yes' if row.get('plateau_seen') else ''} | "
                  f"{'yes' if row.get('plateau') else ''} | {row['seconds']:.0f} s |", flush=True)
    wall = time.perf_counter() - start

    summary = {"all": summarise(rows)}
    for scale in args.scales:
        summary[scale] = summarise([r for r in rows if r["scale"] == scale])
    summary["multiplicity_1"] = summarise([r for r in rows if r["multiplicity"] == 1])
    summary["equilibrated"] = summarise([r for r in rows if r.get("equilibrated")])
    summary["not_on_a_plateau"] = summarise([r for r in rows if not r.get("plateau")])
    print("\n| subset | networks | median |rel. err.| | 90th pct | worst | mean signed | slope | R² |")
    print("|---|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        if "median_rel_error" not in s:
            print(f"| {name} | {s['networks']} | — | — | — | — | — | — |")
            continue
        print(f"| {name} | {s['networks']} | {100 * s['median_rel_error']:.1f} % | {100 * s['p90_rel_error']:.1f} % "
              f"| {100 * s['worst_rel_error']:.1f} % | {_pct(s['mean_signed_rel_error'])} | "
              f"{s.get('slope', float('nan')):.3f} | {s.get('r2', float('nan')):.4f} |")
    print(f"\nwall time {wall:.0f} s on {jax.devices()[0].platform} ({platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores)")
    targets = target_check(summary)
    for line in targets["lines"]:
        print(line)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {"scales": args.scales, "networks": counts, "n": args.n, "chains": args.chains,
                "min_burnin": args.burnin, "min_draws": args.draws, "seed": args.seed,
                "localization": LOCALIZATION, "batch_size": BATCH_SIZE, "input_scale": INPUT_SCALE,
                "teacher": "aligned", "step_size": "auto", "device": str(jax.devices()[0]),
                "jax_version": jax.__version__, "wall_seconds": wall}
    out.write_text(json.dumps({"settings": settings, "summary": summary, "targets": targets["met"], "networks": rows},
                              indent=1,
                              default=float))
    scatter(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
