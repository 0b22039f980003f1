"""`selfdistill train [CONFIG] [section.field=value ...] [--resume runs/NAME | --resume auto]`,
`selfdistill eval CHECKPOINT_OR_CONFIG [field=value ...] [--k K] [--out DIR]`,
`selfdistill plot RUN_DIR_OR_EVAL [...] [--out FILE]`,
`selfdistill train CONFIG --dry-run [--cluster-spec nodes=2,gpus_per_node=8]`,
`selfdistill submit CONFIG [overrides] --address ADDR [--no-wait]`,
`selfdistill sweep SWEEP.yaml [--submit ADDR] [--dry-run] [--report]`,
`selfdistill export RUN_OR_CHECKPOINT --merged OUT`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selfdistill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tr = sub.add_parser("train", help="train a policy (no CONFIG: the embedded CPU default job)")
    tr.add_argument("config", nargs="?", help="YAML config file; omitted: the embedded CPU default")
    tr.add_argument("overrides", nargs="*", help="dotted overrides, e.g. learner.lr=1e-5")
    tr.add_argument("--resume", metavar="RUN_DIR|auto",
                    help="continue runs/NAME from its last checkpoint; `auto`: the config's own run folder, "
                    "if it has a complete checkpoint (else start fresh)")
    tr.add_argument("--dry-run", action="store_true",
                    help="print the resolved config and the placement plan (actor -> node, bundle, memory); start nothing")
    tr.add_argument("--cluster-spec", metavar="nodes=N,gpus_per_node=G",
                    help="plan against this cluster instead of the live one (with --dry-run); also cpus_per_node, "
                    "gpu_memory_gib")
    sb = sub.add_parser("submit", help="run `train` as a Ray job on a cluster (see launch/submit.py)")
    sb.add_argument("config", nargs="?", help="YAML config file inside the working dir; omitted: the CPU default")
    sb.add_argument("overrides", nargs="*", help="dotted overrides, e.g. run.output_dir=/shared/runs")
    sb.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://HEAD:8265")
    sb.add_argument("--no-wait", action="store_true", help="return after submitting (print the job id only)")
    sb.add_argument("--python", help="Python on the cluster nodes that has selfdistill installed (default: this one)")
    ev = sub.add_parser("eval", help="Avg@k, pass@k, maj@k and reasoning health of a checkpoint (see eval/run.py)")
    ev.add_argument("target", help="Hugging Face model folder (e.g. runs/NAME/checkpoints/step-N) or EvalConfig YAML")
    ev.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sampling.temperature=0.6 engine.name=hf")
    ev.add_argument("--k", type=int, help="samples per problem (default 8)")
    ev.add_argument("--out", metavar="DIR", help="folder for results.json and samples.jsonl (default MODEL/eval)")
    pl = sub.add_parser("plot", help="PNG of training curves (run folders) and pass@k curves (eval results)")
    pl.add_argument("paths", nargs="+", metavar="PATH", help="run folder (metrics.jsonl) or eval results.json / folder")
    pl.add_argument("--out", metavar="FILE", help="PNG path (default RUN_DIR/plots.png for one run, else plots.png)")
    ex = sub.add_parser("export", help="write a checkpoint (full or LoRA adapter) as a full Hugging Face folder")
    ex.add_argument("source", help="run folder (its last checkpoint) or checkpoint folder")
    ex.add_argument("--merged", metavar="OUT", required=True, help="output folder: base + adapter merged, tokenizer")
    sw = sub.add_parser("sweep", help="a grid of training runs from a sweep file (see launch/sweep.py)")
    sw.add_argument("sweep_file", metavar="SWEEP.yaml", help="sweep file: base config, set, grid, zip, metrics")
    sw.add_argument("--submit", metavar="ADDR", help="submit the points as jobs to the Ray cluster at ADDR")
    sw.add_argument("--dry-run", action="store_true", help="list the points and their resolved configs; run nothing")
    sw.add_argument("--report", action="store_true", help="only gather the table and plots of what has finished")
    args, extra = parser.parse_known_args(argv)
    if args.command == "eval" and not any(a.startswith("-") for a in extra):  # overrides after --k/--out
        args.overrides, extra = [*args.overrides, *extra], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "export":
        return _export(args)
    if args.command == "sweep":
        return _sweep(args)
    if args.command in ("eval", "plot"):
        return _eval(args) if args.command == "eval" else _plot(args)

    from selfdistill.config import ConfigError, load_config

    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not Path(config).exists():  # only overrides were given
        config, overrides = None, [config, *overrides]
    try:
        if args.command == "submit":
            from selfdistill.launch.submit import submit

            _, status = submit(config, overrides, args.address, wait=not args.no_wait, python=args.python)
            return 0 if status in ("SUCCEEDED", "SUBMITTED") else 1
        if args.command == "train":
            from selfdistill.launch.run_dir import latest_checkpoint

            resume_from = None
            if args.resume == "auto":
                overrides.append("run.resume=auto")
            elif args.resume:
                run_dir = Path(args.resume)
                if not (run_dir / "config.yaml").is_file():
                    raise ConfigError(f"--resume: {run_dir} holds no config.yaml (not a run folder)")
                resume_from = latest_checkpoint(run_dir)
                if resume_from is None:
                    raise ConfigError(f"--resume: {run_dir} has no complete checkpoint under checkpoints/")
                config = config or str(run_dir / "config.yaml")
            if args.dry_run:
                from selfdistill.launch.placement import dry_run

                print(dry_run(load_config(config, overrides), args.cluster_spec))
                return 0
            cfg = load_config(config, overrides)
            from selfdistill.launch.faults import RoleFailed
            from selfdistill.launch.train import train

            try:
                train(cfg, resume_from)
            except RuntimeError as e:  # RoleFailed, or the rollout pipeline's error that wraps one
                failed = e if isinstance(e, RoleFailed) else e.__cause__
                if not isinstance(failed, RoleFailed):
                    raise
                print(f"selfdistill: run stopped: {failed}", file=sys.stderr)
                return 3
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"selfdistill: error: {e}", file=sys.stderr)
        return 2
    return 0


def _eval(args: argparse.Namespace) -> int:
    from selfdistill.config import ConfigError

    try:
        from selfdistill.eval.run import load_eval_config, run_eval, summary_table

        cfg = load_eval_config(args.target, args.overrides, k=args.k, out=args.out)
        results = run_eval(cfg)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"selfdistill: error: {e}", file=sys.stderr)
        return 2
    print(summary_table(results))
    print(f"results: {cfg.out_dir / 'results.json'}  samples: {cfg.out_dir / 'samples.jsonl'}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from selfdistill.launch.run_dir import latest_checkpoint
    from selfdistill.models.lora import export_merged

    source = Path(args.source)
    checkpoint = latest_checkpoint(source) if (source / "config.yaml").is_file() else source
    if checkpoint is None or not any((checkpoint / f).is_file() for f in ("config.json", "adapter_config.json")):
        print(f"selfdistill: error: {source} is neither a run folder with a checkpoint nor a model or adapter "
              f"folder", file=sys.stderr)
        return 2
    print(f"merged: {export_merged(str(checkpoint), args.merged)}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from selfdistill.config import ConfigError
    from selfdistill.launch.sweep import load_sweep, run_sweep, write_report

    try:
        if args.report:
            rows = write_report(*load_sweep(args.sweep_file))
        else:
            rows = run_sweep(args.sweep_file, submit=args.submit, dry_run=args.dry_run)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"selfdistill: error: {e}", file=sys.stderr)
        return 2
    return 1 if any(row.get("status") == "failed" for row in rows) else 0


def _plot(args: argparse.Namespace) -> int:
    from selfdistill.eval.plots import plot_runs

    paths = [Path(p) for p in args.paths]
    out = args.out or (paths[0] / "plots.png" if len(paths) == 1 and paths[0].is_dir() else "plots.png")
    try:
        written = plot_runs(paths, out)
    except (ValueError, FileNotFoundError) as e:
        print(f"selfdistill: error: {e}", file=sys.stderr)
        return 2
    print(f"plot: {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
