"""`selfjudge eval`: benchmarks on a checkpoint, and the same evaluation inside training.

    selfjudge eval --checkpoint RUN_DIR|CKPT_DIR|HF_DIR --benchmarks mathvision,wemath --data ROOT
                   [--limit N] [--seed S] [--n K --temperature T] [--out DIR]

The checkpoint is a run directory (its newest complete checkpoint and its config.yaml), a
checkpoint root (`.../checkpoints`) or a step folder of one: the model is rebuilt by the run's
model family and loaded with megatron/checkpoint.py. An HF model folder is built by the model
family that accepts it (the config's other keys at their dataclass defaults: prompts up to 1024
tokens, responses up to 2048, the `full` format instruction). Generation goes through the rollout
engine of `rollout.backend`. Greedy by default; `--n K` samples K responses at `--temperature` and
grades the majority answer (maj@K; sampled pass@1 is reported beside it).

Per benchmark it writes, into `<run dir>/eval/` (or --out):
  <benchmark>.json               accuracy, per sub-category, the benchmark's own scores, counts,
                                 skipped rows (file, row, reason), settings and versions
  <benchmark>.predictions.jsonl  one line per graded item: question id, response, extracted and
                                 canonical answer, gold, correct (so any grade can be audited)
  report.md                      table per benchmark, per sub-category, and the average

During training (`trainer.eval_every`), `evaluate_in_training` runs the same code on the live
policy with the trainer's engine, writes the files under `<run dir>/eval/step_XXXXXXXX/` and
returns `eval/<benchmark>/accuracy` for metrics.jsonl. Each data-parallel rank generates for its
share of every batch (all ranks of a model-parallel group together, as the engine needs) and the
results are gathered; the main rank writes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from megatron_selfjudge.eval.benchmarks import (
    BENCHMARK_NAMES,
    Benchmark,
    BenchItem,
    BenchmarkData,
    Skipped,
    get_benchmark,
    iter_items,
)
from megatron_selfjudge.eval.benchmarks_grading import Graded, Summary, canonical_answer, is_correct, \
    majority_answer, summarize
from megatron_selfjudge.rewards.answers import extract_boxed

PROTOCOL = ("rule-based: the last \\boxed{} of the response, graded with the project's answer code "
            "(megatron_selfjudge.rewards.answers); not VLMEvalKit's LLM answer extractor")


EXTRACTORS = ("rule", "policy")
# --extractor policy: a response without a \boxed{} answer is shown to the evaluated model, which
# is asked to restate its final answer in a box (the project's wording; VLMEvalKit uses its own
# prompt and a separate LLM).
EXTRACT_PROMPT = ("{question}\n\nA response to this question:\n{response}\n\nWhat final answer does that "
                  "response give? Write only that answer as \\boxed{{ANSWER}}, or \\boxed{{none}} if it gives none.")
EXTRACT_TOKENS = 64  # new tokens of an extraction reply: a box and its short content


def protocol(settings: "EvalSettings") -> str:
    """How answers were extracted and graded, for the JSON and the report."""
    if settings.extractor == "policy":
        return PROTOCOL + "; a response without a box is shown to the evaluated model, asked to restate its answer"
    return PROTOCOL


class EvalError(ValueError):
    """An evaluation that cannot run as asked (bad argument, folder, checkpoint); one line."""


@dataclass(frozen=True)
class EvalSettings:
    """How responses are generated and how many problems are read."""

    n: int = 1  # responses per question; > 1: sampled, maj@n
    temperature: float = 1.0  # sampling temperature when n > 1
    top_p: float = 1.0
    max_new_tokens: int = 2048
    seed: int = 0
    limit: Optional[int] = None  # first N problems of each benchmark
    instruction: str = "full"  # data.prompts instruction name appended to every question
    batch_size: int = 64  # questions generated together
    extractor: str = "rule"  # rule: the last \boxed{} only; policy: also ask the model when there is none


# A generator turns items into, per item, its K response texts or the reason it was skipped.
Generate = Callable[[Sequence[BenchItem], EvalSettings], list[Union[list[str], Skipped]]]


def _data_parallel() -> tuple[int, int, Any]:
    """(rank, size, group) of megatron's data-parallel group; (0, 1, None) outside a megatron run."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return 0, 1, None
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return 0, 1, None
    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size(), ps.get_data_parallel_group()


def _over_data_parallel(fn: Callable[[Sequence[Any]], list], items: Sequence[Any]) -> list:
    """fn over this data-parallel rank's share of items (every dp-th one), gathered in order on every rank.

    The ranks of one model-parallel group share a data-parallel rank, so they generate for the same
    items together, as the engine needs; samples are seeded per uid, so the results do not depend
    on the data-parallel size.
    """
    import torch.distributed as dist

    rank, size, group = _data_parallel()
    if size == 1:
        return fn(items)
    parts: list = [None] * size
    dist.all_gather_object(parts, fn(items[rank::size]), group=group)
    out: list = [None] * len(items)
    for r, part in enumerate(parts):
        out[r::size] = part
    return out


class PolicyGenerator:
    """Generation through a model family and a rollout engine (the live policy or a loaded checkpoint).

    With data parallelism each data-parallel rank generates for its share of every batch and the
    results are gathered, so every rank grades all of them (the main rank writes).
    """

    def __init__(self, family: Any, engine: Any, max_prompt_len: int):
        self.family, self.engine, self.max_prompt_len = family, engine, max_prompt_len

    def _request(self, item: BenchItem, text: str, instruction: str, uid: str, limit: int, what: str):
        from megatron_selfjudge.rollout.base import RolloutRequest

        images = list(item.images)  # decoded here, one item at a time (DatasetError when broken)
        ids = self.family.prompt_ids(text, self.family.num_images(images), instruction)
        pixels = self.family.images(images) if images else None  # None too for a text-only family
        if pixels is not None:  # a processor that writes one token per image embedding grows the placeholders
            ids = self.family.expand_images(ids, pixels)
        if len(ids) > limit:  # counted as the trainer counts them (Trainer.encode): after the expansion
            raise ValueError(f"prompt of {len(ids)} tokens exceeds {what}={limit}")
        # The uid keys the per-sample seeds (rollout/sampling.row_seed): stable whatever the batch.
        return RolloutRequest(uid=uid, prompt_ids=ids, images=pixels)

    def extract(self, pending: Sequence[tuple[BenchItem, str]], s: EvalSettings) -> list[Optional[str]]:
        """--extractor policy: the model's restatement (in a box) of each response's final answer, greedy.

        An extraction prompt longer than the context the responses had (prompt + response tokens) is
        not asked: its answer stays None.
        """
        return _over_data_parallel(lambda share: self._extract(share, s), pending)

    def _extract(self, pending: Sequence[tuple[BenchItem, str]], s: EvalSettings) -> list[Optional[str]]:
        from megatron_selfjudge.data.datasets import DatasetError
        from megatron_selfjudge.rollout.base import SamplingConfig

        new_tokens = min(EXTRACT_TOKENS, s.max_new_tokens)
        limit = self.max_prompt_len + s.max_new_tokens - new_tokens
        requests, positions = [], []
        for k, (item, response) in enumerate(pending):
            try:
                requests.append(self._request(item, EXTRACT_PROMPT.format(question=item.prompt, response=response),
                                              "", f"extract:{item.benchmark}:{item.qid}:{k}", limit,
                                              "the extraction prompt limit"))
                positions.append(k)
            except (DatasetError, ValueError):
                continue
        out: list[Optional[str]] = [None] * len(pending)
        if requests:
            replies = self.engine.generate(requests, SamplingConfig(n=1, greedy=True, max_new_tokens=new_tokens,
                                                                    seed=s.seed))
            for k, reply in zip(positions, replies):
                answer = extract_boxed(reply.text)
                out[k] = None if answer is None or answer.strip().lower() == "none" else answer
        return out

    def __call__(self, items: Sequence[BenchItem], s: EvalSettings) -> list[Union[list[str], Skipped]]:
        """Per item, its `s.n` response texts, or the reason it was skipped (image, prompt length)."""
        return _over_data_parallel(lambda share: self._generate(share, s), items)

    def _generate(self, items: Sequence[BenchItem], s: EvalSettings) -> list[Union[list[str], Skipped]]:
        from megatron_selfjudge.data.datasets import DatasetError
        from megatron_selfjudge.data.prompts import get_instruction
        from megatron_selfjudge.rollout.base import SamplingConfig

        out: list[Union[list[str], Skipped]] = []
        requests, positions = [], []
        for item in items:
            try:
                requests.append(self._request(item, item.prompt, get_instruction(s.instruction),
                                              f"{item.benchmark}:{item.qid}", self.max_prompt_len,
                                              "rollout.max_prompt_len"))
                positions.append(len(out))
                out.append([])
            except (DatasetError, ValueError) as exc:
                out.append(Skipped(item.source_file, item.row, str(exc).removeprefix(f"{item.where}: ")))
        if requests:
            greedy = s.n == 1
            sampling = SamplingConfig(n=s.n, greedy=greedy, temperature=1.0 if greedy else s.temperature,
                                      top_p=1.0 if greedy else s.top_p, max_new_tokens=s.max_new_tokens, seed=s.seed)
            trajectories = self.engine.generate(requests, sampling)
            for k, pos in enumerate(positions):
                out[pos] = [t.text for t in trajectories[k * s.n:(k + 1) * s.n]]
        return out


@dataclass
class BenchmarkResult:
    """What one benchmark's evaluation produced."""

    bench: Benchmark
    summary: Summary
    skipped: list[Skipped]
    rows_read: int
    files: list[str]
    predictions: list[dict]

    def as_json(self, settings: EvalSettings, extra: dict) -> dict:
        """The eval/<benchmark>.json document."""
        s = self.summary
        return {"benchmark": self.bench.title, "protocol": protocol(settings), "accuracy": s.accuracy,
                "correct": s.correct,
                "graded": s.graded, "skipped": len(self.skipped), "rows_read": self.rows_read,
                **({"sampled_pass1": s.sampled_pass1} if s.sampled_pass1 is not None else {}),
                "scores": s.scores, "categories": s.categories,
                "skipped_rows": [x.as_dict() for x in self.skipped], "files": self.files,
                "settings": {**asdict(settings), "metric": f"maj@{settings.n}" if settings.n > 1 else "greedy"},
                **extra}


Extract = Callable[[Sequence[tuple[BenchItem, str]], EvalSettings], list[Optional[str]]]


def evaluate_benchmark(bench: Benchmark, root: Union[str, Path], generate: Generate, settings: EvalSettings, *,
                       limits: Any = None, advance: Callable[[str], None] = lambda desc="": None,
                       should_stop: Optional[Callable[[], bool]] = None,
                       extract: Optional[Extract] = None) -> BenchmarkResult:
    """Stream a benchmark's items, generate in batches, grade; skipped rows are kept with their reason.

    `should_stop` is polled before every generation batch (eval.heldout.EvalInterrupted when True).
    `extract` (settings.extractor == "policy") restates the answers of responses without a box.
    """
    from megatron_selfjudge.eval.heldout import EvalInterrupted

    data = BenchmarkData(bench, [])
    graded: list[Graded] = []
    predictions: list[dict] = []
    skipped_at_generation: list[Skipped] = []

    def run(batch: list[BenchItem]) -> None:
        if should_stop is not None and should_stop():
            raise EvalInterrupted("evaluation interrupted by a stop request")
        results = generate(batch, settings)
        answers_of = [[extract_boxed(t) for t in r] if not isinstance(r, Skipped) else [] for r in results]
        by = [["rule" if a is not None else None for a in answers] for answers in answers_of]
        if extract is not None and settings.extractor == "policy":
            pending = [(i, k) for i, r in enumerate(results) if not isinstance(r, Skipped)
                       for k, a in enumerate(answers_of[i]) if a is None and r[k].strip()]
            found = extract([(batch[i], results[i][k]) for i, k in pending], settings) if pending else []
            for (i, k), answer in zip(pending, found):
                if answer is not None:
                    answers_of[i][k], by[i][k] = answer, "policy"
        for item, result, answers, how in zip(batch, results, answers_of, by):
            advance(bench.title)
            if isinstance(result, Skipped):
                skipped_at_generation.append(result)
                continue
            chosen = answers[0] if settings.n == 1 else majority_answer(item, answers)
            ok = is_correct(item, chosen)
            share = sum(is_correct(item, a) for a in answers) / len(answers) if settings.n > 1 else float(ok)
            graded.append(Graded(item.qid, item.group, item.part, item.categories, ok, share))
            predictions.append({"id": item.qid, "group": item.group, "part": item.part,
                                "response": result[0] if settings.n == 1 else result,
                                "extracted": chosen, "extracted_by": how[0] if settings.n == 1 else how,
                                "canonical": canonical_answer(item, chosen),
                                "gold": item.gold, "correct": ok, "categories": item.categories,
                                "file": item.source_file, "row": item.row})

    batch: list[BenchItem] = []
    for item in iter_items(bench, root, limit=settings.limit, limits=limits, data=data):
        batch.append(item)
        if len(batch) >= settings.batch_size:
            run(batch)
            batch = []
    if batch:
        run(batch)
    summary = summarize(bench.name, graded, bench.categories, settings.n)
    return BenchmarkResult(bench, summary, data.skipped + skipped_at_generation, data.rows_read,
                           [str(f) for f in data.files], predictions)


# ---------------------------------------------------------------- writing

def versions() -> dict:
    """Versions of the packages grading and generation depend on."""
    from importlib import metadata

    out = {}
    for name in ("megatron-selfjudge", "torch", "megatron-core", "math-verify", "pyarrow"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def format_report(results: Sequence[BenchmarkResult], settings: EvalSettings, title: str) -> str:
    """report.md: the headline table with the average, then each benchmark's sub-categories and scores."""
    metric = f"maj@{settings.n}" if settings.n > 1 else "greedy"
    lines = [f"# Evaluation: {title}", "", f"Protocol: {protocol(settings)}. Decoding: {metric}"
             + (f", temperature {settings.temperature}" if settings.n > 1 else "")
             + (f". Limit: first {settings.limit} problems per benchmark" if settings.limit else "") + ".", "",
             "| benchmark | accuracy (%) | correct | graded | skipped |", "|---|---|---|---|---|"]
    accs = []
    for r in results:
        s = r.summary
        lines.append(f"| {r.bench.title} | {_pct(s.accuracy)} | {s.correct} | {s.graded} | {len(r.skipped)} |")
        if s.accuracy is not None:
            accs.append(s.accuracy)
    lines.append(f"| average | {_pct(sum(accs) / len(accs) if accs else None)} | | | |")
    for r in results:
        s = r.summary
        lines += ["", f"## {r.bench.title}", ""]
        if r.bench.name == "wemath" and s.scores:
            lines += ["| WeMath | IK | IG | CM | RM | score (%) |", "|---|---|---|---|---|---|"]
            for mode in ("strict", "loose"):
                c = s.scores[mode]
                lines.append(f"| {mode} | {c['IK']} | {c['IG']} | {c['CM']} | {c['RM']} | {_pct(c['score'])} |")
            lines += [f"", f"{s.scores['composites']} complete composite problems "
                      f"({s.scores['incomplete_composites']} incomplete, not scored).", ""]
        if r.bench.name == "dynamath" and s.scores:
            lines += [f"Average accuracy {_pct(s.scores['average_accuracy'])}%, worst case "
                      f"{_pct(s.scores['worst_case_accuracy'])}% over {s.scores['questions']} questions.", ""]
        for name, cells in s.categories.items():
            lines += [f"| {name} | accuracy (%) | n |", "|---|---|---|"]
            lines += [f"| {v} | {_pct(c['accuracy'])} | {c['n']} |" for v, c in cells.items()]
            lines.append("")
        if r.skipped:
            lines.append(f"{len(r.skipped)} rows skipped (reasons in {r.bench.name}.json), e.g. "
                         f"{r.skipped[0].file} row {r.skipped[0].row}: {r.skipped[0].reason}")
    return "\n".join(lines).rstrip() + "\n"


def write_results(out_dir: Union[str, Path], results: Sequence[BenchmarkResult], settings: EvalSettings,
                  title: str, extra: Optional[dict] = None) -> Path:
    """eval/<benchmark>.json, eval/<benchmark>.predictions.jsonl and eval/report.md under out_dir."""
    from megatron_selfjudge.runtime.files import write_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    extra = {"versions": versions(), **(extra or {})}
    for r in results:
        write_atomic(out / f"{r.bench.name}.json", json.dumps(r.as_json(settings, extra), indent=2) + "\n")
        write_atomic(out / f"{r.bench.name}.predictions.jsonl",
                     "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in r.predictions))
    write_atomic(out / "report.md", format_report(results, settings, title))
    return out


def run_benchmarks(names: Sequence[str], root: Union[str, Path], generate: Generate, settings: EvalSettings,
                   console: Any, limits: Any = None, should_stop: Optional[Callable[[], bool]] = None,
                   extract: Optional[Extract] = None) -> list[BenchmarkResult]:
    """Evaluate each benchmark in turn, with a progress bar per benchmark."""
    results = []
    for name in names:
        bench = get_benchmark(name)
        # The number of items is known only once the files are read (they stream): no total.
        with console.progress(f"eval {bench.title}", None, 0) as advance:
            results.append(evaluate_benchmark(bench, root, generate, settings, limits=limits, advance=advance,
                                              should_stop=should_stop, extract=extract))
        s = results[-1].summary
        console.info(f"{bench.title}: accuracy {_pct(s.accuracy)}% ({s.correct}/{s.graded}), "
                     f"{len(results[-1].skipped)} rows skipped")
    return results


# ---------------------------------------------------------------- inside training

def metric_key(benchmark: str) -> str:
    """The metrics.jsonl key of a benchmark's accuracy."""
    return f"eval/{benchmark}/accuracy"


def evaluate_in_training(trainer: Any, step: int, should_stop: Optional[Callable[[], bool]] = None) -> dict:
    """trainer.eval_benchmarks on the live policy at `step`; files under eval/step_XXXXXXXX; metrics out."""
    from megatron_selfjudge.data.datasets import ImageLimits
    from megatron_selfjudge.megatron.checkpoint import step_dir_name

    cfg = trainer.cfg
    t, r = cfg.trainer, cfg.rollout
    settings = EvalSettings(max_new_tokens=r.max_response_len, seed=t.seed, limit=t.eval_limit or None,
                            instruction=cfg.data.instruction, batch_size=r.max_batch_size)
    generate = PolicyGenerator(trainer.family, trainer.engine, r.max_prompt_len)
    limits = ImageLimits.from_config(cfg.data, image_size=cfg.model.image_size)
    results = run_benchmarks(t.eval_benchmarks, t.eval_data, generate, settings, trainer.log, limits, should_stop)
    if trainer.main:
        write_results(trainer.run_dir / "eval" / step_dir_name(step), results, settings,
                      f"{trainer.run_dir} at step {step}", {"step": step})
    return {metric_key(x.bench.name): x.summary.accuracy for x in results}


# ---------------------------------------------------------------- the command

class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (exit code 2, as every bad argument)."""

    def error(self, message: str):
        print(f"selfjudge eval: {message} (see selfjudge eval --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `selfjudge eval`."""
    p = _Parser(prog="selfjudge eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="run directory, checkpoint root or step folder, or an HF model folder (needs --out)")
    p.add_argument("--benchmarks", required=True, help=f"comma-separated: {','.join(BENCHMARK_NAMES)}")
    p.add_argument("--data", required=True, help="folder holding the benchmarks' files (see eval/benchmarks.py)")
    p.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (n > 1)")
    p.add_argument("--n", type=int, default=1, help="responses per question; > 1 grades the majority (maj@n)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature when --n > 1")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling when --n > 1")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's rollout.max_response_len")
    p.add_argument("--instruction", default=None, help="format instruction (default: the run's data.instruction)")
    p.add_argument("--extractor", default="rule", choices=EXTRACTORS,
                   help="rule: the last \\boxed{} only; policy: a response without one is shown to the evaluated "
                        "model, which restates its final answer in a box")
    p.add_argument("--out", default=None, help="output folder (default: <run dir>/eval)")
    return p


def _check_args(a: argparse.Namespace) -> list[str]:
    names = [n.strip().lower() for n in a.benchmarks.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARK_NAMES]
    if not names or unknown:
        raise EvalError(f"--benchmarks: unknown {', '.join(unknown) or '(none given)'}; choose from "
                        f"{','.join(BENCHMARK_NAMES)}")
    if len(set(names)) != len(names):
        raise EvalError(f"--benchmarks: a benchmark is named twice in {a.benchmarks!r}")
    if not Path(a.data).is_dir():
        raise EvalError(f"--data {a.data}: not a folder")
    if a.limit is not None and a.limit < 1:
        raise EvalError(f"--limit must be >= 1, got {a.limit}")
    if a.n < 1:
        raise EvalError(f"--n must be >= 1, got {a.n}")
    if not (a.temperature > 0 and a.temperature < float("inf")):
        raise EvalError(f"--temperature must be a finite number > 0, got {a.temperature}")
    if not 0 < a.top_p <= 1:
        raise EvalError(f"--top-p must be in (0, 1], got {a.top_p}")
    if a.seed < 0:
        raise EvalError(f"--seed must be >= 0, got {a.seed}")
    if a.max_new_tokens is not None and a.max_new_tokens < 1:
        raise EvalError(f"--max-new-tokens must be >= 1, got {a.max_new_tokens}")
    if a.instruction is not None:
        from megatron_selfjudge.data.prompts import INSTRUCTIONS

        if a.instruction not in INSTRUCTIONS:
            raise EvalError(f"--instruction {a.instruction!r} is not one of {', '.join(INSTRUCTIONS)}")
    return names


def is_hf_folder(path: Union[str, Path]) -> bool:
    """An HF model folder (config.json, no run config) rather than a run directory or checkpoint."""
    p = Path(path)
    return (p / "config.json").is_file() and not (p / "config.yaml").is_file()


def hf_config(path: Union[str, Path]) -> Any:
    """The config of an HF folder: the model family that accepts the folder, the dataclass defaults otherwise.

    Families that load HF weights (`ModelFamily.load_hf` overridden) are asked in turn; each refuses
    a folder of another model kind in its constructor, so no model is named here.
    """
    from megatron_selfjudge.config import ConfigError, load_config
    from megatron_selfjudge.megatron.models.family import ModelFamily, family_class, family_names

    problems = []
    for name in family_names():
        if family_class(name).load_hf is ModelFamily.load_hf:
            continue  # an in-process family (tiny): it cannot read an HF folder
        try:
            cfg = load_config(None, [f"model.preset={name}", f"model.hf_path={Path(path).resolve()}"],
                              embedded_default=False)
            family_class(name)(cfg)
            return cfg
        except ConfigError as exc:
            problems.append(f"{name}: {exc}")
    raise EvalError(f"--checkpoint {path}: no model family loads this HF folder"
                    + (f" ({'; '.join(problems)})" if problems else " (none of the families reads HF folders)"))


def _evaluate_checkpoint(a: argparse.Namespace) -> int:
    from megatron_selfjudge.data.datasets import ImageLimits
    from megatron_selfjudge.megatron.models.family import build_family
    from megatron_selfjudge.rollout.base import build_engine
    from megatron_selfjudge.runtime.trained_policy import load_policy, load_run_config, locate
    from megatron_selfjudge.runtime.console import Console
    from megatron_selfjudge.runtime.setup import is_main_rank, setup_distributed, teardown_distributed

    names = _check_args(a)
    where = None
    if is_hf_folder(a.checkpoint):
        cfg, run_dir = hf_config(a.checkpoint), Path(a.checkpoint)
        if a.out is None:
            raise EvalError("--out is needed with an HF folder (results are not written into the model folder)")
    else:
        where = locate(a.checkpoint)
        cfg, run_dir = load_run_config(where), where.config_file.parent
    # One process evaluates at TP=PP=1 (the checkpoint reshards on load); under torchrun the run's layout.
    launched = "WORLD_SIZE" in os.environ
    created = setup_distributed(cfg.parallel.tp if launched else 1, cfg.parallel.pp if launched else 1, a.seed)
    try:
        log = Console(is_main_rank())
        if where is None:
            family = build_family(cfg)
            module = family.builder()()  # an HF family's builder loads the folder's weights
            source, step = run_dir, None
        else:  # the newest intact checkpoint (or exactly the step folder named)
            loaded = load_policy(where, cfg, log.info)
            family, module, source, step = loaded.family, loaded.module, loaded.checkpoint, loaded.step
        log.info(f"loaded {source} (step {step}, model {cfg.model.preset})")
        r = cfg.rollout
        engine = build_engine(r.backend, model=module, tokenizer=family.tokenizer, max_batch_size=r.max_batch_size)
        settings = EvalSettings(n=a.n, temperature=a.temperature, top_p=a.top_p,
                                max_new_tokens=a.max_new_tokens or r.max_response_len, seed=a.seed, limit=a.limit,
                                instruction=a.instruction or cfg.data.instruction,
                                batch_size=max(1, r.max_batch_size // a.n), extractor=a.extractor)
        limits = ImageLimits.from_config(cfg.data, image_size=cfg.model.image_size)
        policy = PolicyGenerator(family, engine, r.max_prompt_len)
        results = run_benchmarks(names, a.data, policy, settings, log, limits, extract=policy.extract)
        if is_main_rank():
            out = write_results(Path(a.out) if a.out else run_dir / "eval", results, settings, str(source),
                                {"checkpoint": str(source), "step": step, "model": cfg.model.preset})
            log.info(f"wrote {out}/report.md")
        return 0
    finally:
        teardown_distributed(created)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`selfjudge eval ...`; bad input gives one line on stderr and exit code 2."""
    from megatron_selfjudge.config import ConfigError
    from megatron_selfjudge.data.datasets import DatasetError
    from megatron_selfjudge.runtime.run_state import CheckpointDamaged
    from megatron_selfjudge.runtime.trained_policy import PolicyLoadError

    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # a usage error (one line, printed by _Parser.error) or --help
        return int(exc.code or 0)
    try:
        return _evaluate_checkpoint(args)
    except (EvalError, PolicyLoadError, DatasetError, ConfigError, FileNotFoundError) as exc:
        print(f"selfjudge eval: {exc}", file=sys.stderr)
        return 2
    except CheckpointDamaged as exc:
        print(f"selfjudge eval: damaged checkpoint: {exc}", file=sys.stderr)
        return 2
