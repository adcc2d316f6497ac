"""`selfjudge data`: write the synthetic task as parquet, or check a local dataset file."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from megatron_selfjudge.data import datasets, synthetic


def _write_synthetic(args: argparse.Namespace) -> int:
    splits = synthetic.make_synthetic_splits(args.seed, args.sft, args.unlabeled, args.test,
                                             image_size=args.image_size, families=args.families)
    out = Path(args.out)
    for name, examples in splits.items():
        path = synthetic.write_geometry3k_parquet(examples, out / f"{name}.parquet", include_meta=True)
        print(f"{path}: {len(examples)} rows")
    return 0


def _check(args: argparse.Namespace) -> int:
    result = datasets.load_records(args.path, schema=args.schema, on_error="skip")
    labelled = sum(r.answer is not None for r in result.records)
    print(f"{args.path}: schema {datasets.detect_schema(args.path) if args.schema == 'auto' else args.schema}, "
          f"{len(result.records)} usable rows ({labelled} with answers), {result.skipped} skipped")
    for msg in result.errors[:20]:
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
    p.add_argument("--schema", default="auto", choices=["auto", "geometry3k", "mmr1", "geoqa", "jsonl"])
    p.set_defaults(func=_check)
    args = parser.parse_args(list(argv))
    return args.func(args)
