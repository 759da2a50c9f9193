"""``slt-jax``: parse a command line, call the library, write results. No maths here."""

import argparse
import importlib
import sys
import time
from pathlib import Path

_DEMO_OUT = "slt-jax-demo"


def _load(spec: str, flag: str):
    """``MODULE:ATTRIBUTE`` → the attribute, importing the module."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise SystemExit(f"slt-jax: {flag} must be MODULE:FACTORY, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise SystemExit(f"slt-jax: {flag} {spec!r}: cannot import {module_name!r} ({error})") from error
    if not hasattr(module, attribute):
        raise SystemExit(f"slt-jax: {flag} {spec!r}: module {module_name!r} has no {attribute!r}")
    return getattr(module, attribute)


def _selector(path: str):
    """``a/b/0`` → a function picking ``state["a"]["b"][0]`` out of a restored state."""
    parts = [part for part in path.split("/") if part]

    def select(state):
        for part in parts:
            state = state[int(part)] if isinstance(state, (list, tuple)) else state[part]
        return state

    select.__qualname__ = f"select[{path}]"
    return select


def _trajectory(args) -> int:
    import jax

    from slt_jax.trajectory.llc_trajectory import llc_trajectory

    model = _load(args.model, "--model")()
    parts = model if isinstance(model, tuple) else (model,)
    loss_fn, template = parts[0], (parts[1] if len(parts) > 1 else None)
    if not callable(loss_fn):
        raise SystemExit(f"slt-jax: --model {args.model!r} must return loss_fn or (loss_fn, params, ...)")
    data = _load(args.data, "--data")()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sampler = {name: getattr(args, name) for name in (
        "num_chains", "num_draws", "num_burnin", "steps_per_draw", "batch_size", "sampler",
        "loss_estimator", "param_mask") if getattr(args, name) is not None}
    steps = None if args.steps is None else [int(s) for s in args.steps.split(",") if s.strip()]
    start = time.perf_counter()
    try:
        curve = llc_trajectory(
            args.checkpoint_dir, loss_fn, data, jax.random.key(args.seed), step_size=args.step_size,
            localization=args.localization, nbeta=args.nbeta, item=args.item,
            select=None if args.select is None else _selector(args.select), steps=steps,
            template=template, results_path=None if args.no_resume else out / "results",
            progress=not args.quiet, **sampler,
        )
    except ValueError as error:
        raise SystemExit(f"slt-jax trajectory: {error}") from error
    stages = curve.stages(smoothing=args.smoothing) if curve.healthy.sum() >= 3 else None
    paths = curve.write(out, stages=stages, seed=args.seed, title=str(args.checkpoint_dir))
    print(curve)
    if stages is not None:
        print("stage boundaries at steps", ", ".join(f"{b:.0f}" for b in stages.boundaries))
    print(f"{len(curve.rows)} checkpoints in {time.perf_counter() - start:.1f} s; wrote "
          + ", ".join(str(p) for p in paths.values()))
    return 0


def _demo(args) -> int:
    out = Path(args.out)
    start = time.perf_counter()
    if args.example == "llc":
        from slt_jax.demos import llc

        result = llc.run(seed=args.seed, progress=not args.quiet)
        print(llc.report(result))
        out.mkdir(parents=True, exist_ok=True)
        result["result"].to_json(out / "llc_result.json")
        print(f"  result written to {out / 'llc_result.json'}")
    elif args.example == "grokking":
        from slt_jax.demos import grokking

        print(grokking.report(grokking.run(out, seed=args.seed, progress=not args.quiet)))
    else:
        from slt_jax.demos import dln_trajectory

        print(dln_trajectory.report(dln_trajectory.run(out, seed=args.seed, progress=not args.quiet)))
    print(f"wall time {time.perf_counter() - start:.1f} s")
    return 0


def _add_trajectory_parser(sub) -> None:
    parser = sub.add_parser(
        "trajectory", help="λ̂ at every checkpoint of an Orbax training run",
        description="Estimate the local learning coefficient at every checkpoint of an Orbax "
        "CheckpointManager directory; write llc_curve.csv, llc_curve.json (with stage "
        "boundaries), llc_curve.png and early_warning.png into --out. Finished checkpoints are "
        "stored in OUT/results as they complete, and a rerun resumes there.",
    )
    parser.add_argument("checkpoint_dir", metavar="CHECKPOINT_DIR",
                        help="the directory given to orbax.checkpoint.CheckpointManager")
    parser.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                        help="a function returning loss_fn, or (loss_fn, params_template, ...), "
                        "where loss_fn(params, batch) is the mean per-sample loss")
    parser.add_argument("--data", required=True, metavar="MODULE:FACTORY",
                        help="a function returning the data pytree (arrays with a leading sample axis)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--item", metavar="NAME",
                        help="the item holding the parameters in a composite checkpoint (e.g. params)")
    parser.add_argument("--select", metavar="KEY[/KEY...]",
                        help="path to the parameters inside a saved training state (e.g. params)")
    parser.add_argument("--steps", metavar="S1,S2,...", help="only these checkpoint steps")
    parser.add_argument("--step-size", type=float, required=True, metavar="EPS",
                        help="SGLD step size ε")
    parser.add_argument("--localization", type=float, metavar="GAMMA",
                        help="localization γ (default nβ/10)")
    parser.add_argument("--nbeta", type=float, help="inverse temperature times n (default n/log n)")
    parser.add_argument("--num-chains", type=int, help="chains per checkpoint (default 8)")
    parser.add_argument("--num-draws", type=int, help="recorded draws per chain (default 500)")
    parser.add_argument("--num-burnin", type=int, help="burn-in steps per chain (default 500)")
    parser.add_argument("--steps-per-draw", type=int, help="sampler steps between draws (default 1)")
    parser.add_argument("--batch-size", type=int, help="minibatch size (default min(256, n))")
    parser.add_argument("--sampler", help="sampler kernel name (default sgld)")
    parser.add_argument("--loss-estimator", choices=["control_variate", "minibatch", "full_batch"],
                        help="what each draw records (default control_variate)")
    parser.add_argument("--param-mask", metavar="REGEX",
                        help="sample only parameters whose pytree path matches (weight-refined LLC)")
    parser.add_argument("--seed", type=int, default=0, help="root PRNG seed (default 0)")
    parser.add_argument("--smoothing", type=float, default=0.1,
                        help="stage-detection kernel width in decades of steps (default 0.1)")
    parser.add_argument("--no-resume", action="store_true",
                        help="do not store per-checkpoint results in OUT/results (no resume)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=_trajectory)


def build_parser() -> argparse.ArgumentParser:
    """The ``slt-jax`` argument parser with its subcommands."""
    parser = argparse.ArgumentParser(prog="slt-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="run an embedded example end to end",
        description="Run an embedded example. The default trains a deep linear network that "
        "learns in stages, saves it with Orbax, and draws its LLC curve with stage boundaries.",
    )
    demo.add_argument(
        "--example", choices=["trajectory", "llc", "grokking"], default="trajectory",
        help="trajectory (default): LLC curve and stages of a deep linear network's training; "
        "llc: λ̂ of one deep linear network next to Aoyagi's exact λ; grokking: LLC curve of "
        "modular addition learned with weight decay",
    )
    demo.add_argument("--seed", type=int, default=0, help="root PRNG seed (default 0)")
    demo.add_argument("--out", default=_DEMO_OUT, metavar="DIR",
                      help=f"output directory (default ./{_DEMO_OUT})")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo)
    _add_trajectory_parser(sub)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``slt-jax`` command."""
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
