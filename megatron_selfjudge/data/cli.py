"""`selfjudge data`: write the synthetic task as parquet, or check a local dataset file."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from megatron_selfjudge import config
from megatron_selfjudge.data import datasets, synthetic


def _write_synthetic(args: argparse.Namespace) -> int:
    splits = synthetic.make_synthetic_splits(args.seed, args.sft, args.unlabeled, args.test,
                                             image_size=args.image_size, families=args.families)
    out = Path(args.out)
    for name, examples in splits.items():
        path = synthetic.write_geometry3k_parquet(examples, out / f"{name}.parquet", include_meta=True)
        print(f"{path}: {len(examples)} rows")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _check(args: argparse.Namespace) -> int:
    limits = datasets.ImageLimits(roots=tuple(args.image_root), max_pixels=args.max_image_pixels,
                                  max_bytes=args.max_image_bytes, max_per_row=args.max_images_per_row)
    # A file that cannot be read at all raises DatasetError: `selfjudge` prints it in one line, exit 2.
    # Streamed: a file of any size is checked a row group at a time (nothing kept but row positions).
    result = datasets.open_records(args.path, schema=args.schema, on_error="skip", limits=limits)
    print(f"{args.path}: schema {result.schema}, {len(result)} usable rows "
          f"({result.labelled} with answers), {result.skipped} skipped")
    for msg in result.errors:
        print(f"  skipped: {msg}")
    return 1 if result.skipped else 0


def main(argv: Sequence[str]) -> int:
    """Entry point of `selfjudge data ...`."""
    parser = argparse.ArgumentParser(prog="selfjudge data")
    sub = parser.add_subparsers(dest="action", required=True)
    p = sub.add_parser("synthetic", help="render the embedded task's splits to parquet (Geometry3K schema)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sft", type=int, default=512)
    p.add_argument("--unlabeled", type=int, default=2048)
    p.add_argument("--test", type=int, default=256)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--families", nargs="+", default=list(synthetic.FAMILIES), choices=synthetic.FAMILIES)
    p.set_defaults(func=_write_synthetic)
    p = sub.add_parser("check", help="load a parquet/JSONL file and report unusable rows")
    p.add_argument("path")
    p.add_argument("--schema", default="auto", choices=list(datasets.SCHEMAS))
    p.add_argument("--image-root", action="append", default=[],
                   help="a folder image paths may point into besides the file's own (data.image_roots)")
    defaults = config.DataConfig()
    for name in ("max_image_pixels", "max_image_bytes", "max_images_per_row"):
        p.add_argument(f"--{name.replace('_', '-')}", type=_positive_int, default=getattr(defaults, name),
                       help=f"as data.{name} (default %(default)s)")
    p.set_defaults(func=_check)
    args = parser.parse_args(list(argv))
    return args.func(args)
