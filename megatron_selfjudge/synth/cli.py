"""`selfjudge synth`: new training questions written by a trained policy, filtered, in the training schema.

    selfjudge synth --checkpoint RUN_DIR --data FILE --strategy in-context|direct --out FILE.parquet|.jsonl
                    [--n K] [--agreement A] [--limit N] [--seed S] [--force] ...

Reads the source rows of FILE (any schema `data.train` reads), asks the policy of RUN_DIR for new
questions (pipeline.py), and writes the kept ones with their majority answers to OUT (writer.py),
plus OUT's stem + ``.summary.json`` with every filter's count. Sampling follows the run's config
(rollout.temperature, top_p, max_response_len for the answers; rollout.n answers per question
unless --n; reward.equivalence groups the answers). Bad arguments: one line, exit 2; an existing
output is kept unless --force.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import NoReturn, Optional, Sequence

from megatron_selfjudge.synth import writer
from megatron_selfjudge.synth.pipeline import DEDUP_SCOPES, SynthCounts, SynthSettings
from megatron_selfjudge.synth.prompts import STRATEGIES, STYLES

PROG = "selfjudge synth"


class SynthArgError(ValueError):
    """Arguments that cannot run as given; one line."""


class _Parser(argparse.ArgumentParser):
    """argparse with its complaint on one line (no usage block), exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{PROG}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `selfjudge synth`."""
    d = SynthSettings
    p = _Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run directory (or its checkpoints/ or a step folder)")
    p.add_argument("--data", required=True, help="source rows: a parquet/JSONL file in a training schema")
    p.add_argument("--strategy", required=True, choices=STRATEGIES)
    p.add_argument("--out", required=True, help="output file, .parquet or .jsonl")
    p.add_argument("--n", type=_positive, default=None, help="sampled answers per new question (default rollout.n)")
    p.add_argument("--agreement", type=_share, default=d.agreement,
                   help="share of the n answers the majority must hold (default %(default)s)")
    p.add_argument("--limit", type=_positive, default=None, help="use the first N source rows")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default trainer.seed)")
    p.add_argument("--per-source", type=_positive, default=d.per_source, help="new questions per source row")
    p.add_argument("--max-similarity", type=float, default=d.max_similarity,
                   help="character-trigram Jaccard at or above which questions are duplicates (default %(default)s)")
    p.add_argument("--dedup-scope", choices=DEDUP_SCOPES, default=d.dedup_scope,
                   help="duplicates among new questions: about the same image, or anywhere in the set")
    p.add_argument("--min-chars", type=_positive, default=d.min_chars)
    p.add_argument("--max-chars", type=_positive, default=d.max_chars)
    p.add_argument("--max-new-tokens", type=_positive, default=None,
                   help=f"tokens per synthesis reply (default min({d.max_question_tokens}, rollout.max_response_len))")
    p.add_argument("--prompt", choices=("auto",) + STYLES, default="auto",
                   help="prompt style; auto: short when the run's data.instruction is short, else full")
    p.add_argument("--backend", default=None, help="rollout engine (default the run's rollout.backend)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    return p


def _check_paths(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    if out.suffix not in writer.FORMATS:
        raise SynthArgError(f"--out {out}: unknown format {out.suffix!r}; use one of {writer.FORMATS}")
    if not Path(args.data).is_file():
        raise SynthArgError(f"--data {args.data}: file not found")
    if out.resolve() == Path(args.data).resolve():
        raise SynthArgError(f"--out {out} is the --data file")
    existing = [str(p) for p in writer.outputs_of(out) if p.exists()]
    if existing and not args.force:
        raise SynthArgError(f"output {existing[0]} already exists (pass --force to replace it)")
    if not out.parent.is_dir():
        raise SynthArgError(f"--out {out}: folder {out.parent} does not exist")
    return out


def _settings(args: argparse.Namespace, cfg) -> SynthSettings:
    r = cfg.rollout
    return SynthSettings(
        strategy=args.strategy, samples=args.n or r.n, temperature=r.temperature, top_p=r.top_p,
        max_answer_tokens=r.max_response_len, seed=cfg.trainer.seed if args.seed is None else args.seed,
        equivalence=cfg.reward.equivalence, timeout=cfg.reward.symbolic_timeout, batch_size=r.max_batch_size,
        agreement=args.agreement, per_source=args.per_source, max_similarity=args.max_similarity,
        dedup_scope=args.dedup_scope, min_chars=args.min_chars, max_chars=args.max_chars,
        max_question_tokens=args.max_new_tokens or min(SynthSettings.max_question_tokens, r.max_response_len))


def print_counts(counts: SynthCounts, bad_rows: int, out: Path) -> None:
    """The per-filter counts as a rich table on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{PROG}: {out}", show_header=True)
    table.add_column("stage")
    table.add_column("count", justify="right")
    table.add_row("source rows read", str(counts.sources))
    table.add_row("source rows unusable (skipped at load)", str(bad_rows))
    table.add_row("source rows with a synthesis prompt over rollout.max_prompt_len", str(counts.prompt_too_long))
    table.add_row("candidate questions generated", str(counts.generated))
    for reason, n in sorted(counts.malformed.items()):
        table.add_row(f"  dropped: malformed ({reason})", str(n))
    table.add_row("  dropped: near-duplicate of the source question", str(counts.duplicate_source))
    table.add_row("  dropped: near-duplicate of another new question", str(counts.duplicate_other))
    table.add_row("  dropped: unanswerable (majority below --agreement)", str(counts.unanswerable))
    table.add_row("kept and written", str(counts.kept), style="bold")
    Console(highlight=False).print(table)


def run(args: argparse.Namespace) -> int:
    """Check everything cheap, then load the policy, synthesise, write the output and its summary."""
    from megatron_selfjudge.data import prompts as data_prompts
    from megatron_selfjudge.data.datasets import ImageLimits, load_records
    from megatron_selfjudge.rollout.base import available_engines, build_engine_for
    from megatron_selfjudge.runtime.console import Console
    from megatron_selfjudge.runtime.files import write_atomic
    from megatron_selfjudge.synth.pipeline import Synthesizer
    from megatron_selfjudge.runtime.trained_policy import load_policy, load_run_config, locate, single_process
    from megatron_selfjudge.synth.prompts import prompt_style

    t0 = time.perf_counter()
    out = _check_paths(args)
    where = locate(args.checkpoint)
    cfg = load_run_config(where)
    try:
        settings = _settings(args, cfg)
    except ValueError as exc:  # a setting out of range, named in the message
        raise SynthArgError(str(exc)) from None
    style = prompt_style(args.prompt, cfg.data.instruction)
    backend = args.backend or cfg.rollout.backend
    if backend not in available_engines():
        raise SynthArgError(f"--backend {backend!r} is not a rollout engine; known: {', '.join(available_engines())}")
    log = Console(True)
    # The run's image limits, at full resolution: the written images are the source's, not the model's size.
    source = load_records(args.data, on_error=cfg.data.on_error, max_rows=args.limit,
                          limits=ImageLimits.from_config(cfg.data))
    if source.skipped:
        log.info(f"{args.data}: skipped {source.skipped} unusable rows (data.on_error=skip), e.g. {source.errors[0]}")
    if not source.records:
        raise SynthArgError(f"--data {args.data}: no usable rows")
    with single_process(settings.seed):
        policy = load_policy(where, cfg, log.info)
        log.info(f"policy: {policy.checkpoint} (step {policy.step}, {cfg.model.preset}); "
                 f"{len(source.records)} source rows, strategy {settings.strategy}, prompt style {style.style}")
        engine = build_engine_for(backend, cfg, model=policy.module,
                                  tokenizer=policy.family.tokenizer, max_batch_size=cfg.rollout.max_batch_size)
        synth = Synthesizer(engine, policy.family, settings, style,
                            answer_instruction=data_prompts.get_instruction(cfg.data.instruction),
                            max_prompt_len=cfg.rollout.max_prompt_len)
        sink = writer.RowWriter(out)
        committed = False
        try:
            chunks = -(-len(source.records) // synth.chunk_size())
            with log.progress("synth", chunks, 0) as advance:
                counts = synth.run(source.records, sink.write, advance)
            sink.close(commit=True)
            committed = True
        finally:
            if not committed:
                sink.close(commit=False)
            engine.close()
    summary = {
        "out": str(out), "rows": sink.rows, "format": out.suffix.lstrip("."), "data": str(args.data),
        "checkpoint": str(policy.checkpoint), "step": policy.step, "model": cfg.model.preset,
        "prompt_style": style.style, "settings": asdict(settings), "counts": counts.as_dict(),
        "source_rows_skipped": source.skipped, "source_row_errors": source.errors[:10],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    write_atomic(writer.summary_path(out), json.dumps(summary, indent=2) + "\n")
    print_counts(counts, source.skipped, out)
    log.info(f"wrote {sink.rows} rows to {out} and the summary to {writer.summary_path(out)}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`selfjudge synth ...`; bad input gives one line on stderr and exit code 2."""
    from megatron_selfjudge.config import ConfigError
    from megatron_selfjudge.data.datasets import DatasetError
    from megatron_selfjudge.runtime.trained_policy import PolicyLoadError

    args = build_parser().parse_args(argv)
    # torch.distributed.checkpoint's deprecation notices on every weights load say nothing about this run.
    warnings.filterwarnings("ignore", message=".*(ShardedTensor|`load_state_dict` is deprecated).*",
                            category=FutureWarning)
    try:
        return run(args)
    except (SynthArgError, PolicyLoadError, ConfigError, DatasetError, FileNotFoundError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
    return 2
