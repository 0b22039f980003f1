"""`selfdistill train [CONFIG] [section.field=value ...] [--resume runs/NAME]`."""

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
    tr.add_argument("--resume", metavar="RUN_DIR", help="continue runs/NAME from its last checkpoint")
    args = parser.parse_args(argv)

    from selfdistill.config import ConfigError, load_config

    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not Path(config).exists():  # only overrides were given
        config, overrides = None, [config, *overrides]
    try:
        if args.command == "train":
            from selfdistill.launch.run_dir import latest_checkpoint

            resume_from = None
            if args.resume:
                run_dir = Path(args.resume)
                if not (run_dir / "config.yaml").is_file():
                    raise ConfigError(f"--resume: {run_dir} holds no config.yaml (not a run folder)")
                resume_from = latest_checkpoint(run_dir)
                if resume_from is None:
                    raise ConfigError(f"--resume: {run_dir} has no complete checkpoint under checkpoints/")
                config = config or str(run_dir / "config.yaml")
            cfg = load_config(config, overrides)
            from selfdistill.launch.train import train

            train(cfg, resume_from)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"selfdistill: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
