"""`selfjudge` command line: train, eval, bench, synth, data.

Single process:  selfjudge train [--config FILE] [key=value ...]
Multi-process:   torchrun --nproc-per-node N -m megatron_selfjudge.cli train parallel.tp=2 ...
With no --config, `train` runs the embedded tiny default on CPU.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from megatron_selfjudge.config import ConfigError, load_config


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML file (default: the embedded tiny CPU config)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides of the config dataclasses, e.g. loss.beta_kl=0.02")


def _cmd_train(args: argparse.Namespace) -> int:
    from megatron_selfjudge import trainer

    cfg = load_config(args.config, args.overrides)
    return trainer.main(cfg)


def _cmd_eval(args: argparse.Namespace) -> int:
    from megatron_selfjudge.eval import runner

    cfg = load_config(args.config, args.overrides)
    return runner.main(cfg, checkpoint=args.checkpoint)


def _cmd_bench(args: argparse.Namespace) -> int:
    from megatron_selfjudge.kernels import bench

    return bench.main(args.bench_args)


def _cmd_synth(args: argparse.Namespace) -> int:
    from megatron_selfjudge.synth import cli as synth_cli

    cfg = load_config(args.config, args.overrides)
    return synth_cli.main(cfg, out=args.out)


def _cmd_data(args: argparse.Namespace) -> int:
    from megatron_selfjudge.data import cli as data_cli

    return data_cli.main(args.data_args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `selfjudge` command."""
    parser = argparse.ArgumentParser(prog="selfjudge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="label-free GRPO post-training (embedded tiny default without --config)")
    _add_config_args(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint on the held-out split or benchmarks")
    _add_config_args(p)
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: latest in trainer.run_dir)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("bench", help="benchmarks; `selfjudge bench kernels --help` for options")
    p.add_argument("what", choices=["kernels"])
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser("synth", help="MM-UPT question synthesis from images")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="parquet file to write")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("data", help="write the synthetic task or inspect local datasets")
    p.add_argument("data_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=_cmd_data)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the `selfjudge` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"selfjudge: config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
