"""The paper's ablation table as one resumable command: stage-1 encoders once, then stage 2 and 3 per row.

    python code/paper_table.py --dry-run                 # the runs and their commands, nothing started
    python code/paper_table.py                           # every row of configs/paper_table/ on real data
    python code/paper_table.py --rows full,model5 --jobs 2
    python code/paper_table.py --seeds 3                 # every row 3 times: mean +- sd, pooled interval
    python code/paper_table.py --stage1 trainer.devices=8 --stage2 trainer.devices=8 --stage3 devices=8

Each run goes to outputs/paper_table/<stage>/<name>; finished runs are skipped, so the same command
resumes. The table: results/paper_table/results.md (see dreamdiffusion/tools/grid.py).
"""

import argparse
import sys

from dreamdiffusion.core.errors import ConfigError, run_cli
from dreamdiffusion.tools.grid import GridRunner, dry_run, load_grid, plan, write_results


def main(argv=None):
    parser = argparse.ArgumentParser(prog="paper_table.py", description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="configs/paper_table", help="the grid folder (grid.yaml + one file per row)")
    parser.add_argument("--rows", default=None, help="comma-separated row names (default: every row)")
    parser.add_argument("--dry-run", action="store_true", help="print the runs and their commands; start nothing")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (each is its own process)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="run every row this many times (seed k > 0 under <outputs>/seed<k>, each stage's seed "
                             "+ k); the table gives mean +- sd over seeds (default 1)")
    for stage in ("stage1", "stage2", "stage3"):
        parser.add_argument(f"--{stage}", nargs="*", default=[], metavar="KEY=VALUE",
                            help=f"overrides for every {stage} run (e.g. trainer.devices=8)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
    if args.seeds < 1:
        raise ConfigError(f"--seeds must be >= 1, got {args.seeds}")
    spec, rows = load_grid(args.grid)
    if args.rows:
        wanted = args.rows.split(",")
        unknown = sorted(set(wanted) - {r.name for r in rows})
        if unknown:
            raise ConfigError(f"--rows: no row named {unknown} in {args.grid} (rows: {', '.join(r.name for r in rows)})")
        rows = [r for r in rows if r.name in wanted]
    runs = plan(spec, rows, extra={"stage1": args.stage1, "stage2": args.stage2, "stage3": args.stage3},
                seeds=args.seeds)
    if args.dry_run:
        print(dry_run(runs, rows))
        return runs
    GridRunner(runs, jobs=args.jobs).run()
    summary = write_results(spec, rows, runs)
    print(f"wrote {spec.results}/results.md")
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main))
