"""``slt-jax``: parse a command line, call the library, write results. No maths here."""

import argparse
import sys
import time


def _demo(args) -> int:
    from slt_jax.demos import llc

    start = time.perf_counter()
    out = llc.run(seed=args.seed, progress=not args.quiet)
    print(llc.report(out))
    print(f"  wall time {time.perf_counter() - start:.1f} s")
    if args.out:
        out["result"].to_json(args.out)
        print(f"  result written to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slt-jax", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run an embedded example end to end")
    demo.add_argument("--example", choices=["llc"], default="llc",
                      help="llc: λ̂ of a deep linear network next to Aoyagi's exact λ")
    demo.add_argument("--seed", type=int, default=0, help="root PRNG seed")
    demo.add_argument("--out", help="write the result as JSON to this path")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
