"""How well a generative Judge grades, measured where the truth is known: the synthetic task.

For each held-out problem of the run's synthetic task, its right solution and every flawed one
(`data.synthetic.flawed_solutions`: a misread trace, an arithmetic slip, a boxed answer that is not
the trace's result) go through the trainer's own Judge path (`judges.GenerativeJudge`, the run's
`judge.rubric`), greedy unless `--temperature` is given. Printed and written as JSON: the mean parsed
score per kind of candidate, the unparsed count, and the AUC of right against flawed candidates
(the chance that a right solution scores above a flawed one of the same set; ties count half).

    python -m megatron_selfjudge.eval.judge_check --checkpoint RUN_DIR/checkpoints/initial [--limit N] [--out FILE]

`checkpoints/initial` is the warm start, which is what the trainer's frozen Judge is.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

RIGHT = "right"


def candidates(examples: Sequence, seed: int) -> list[tuple[int, str, str]]:
    """(example index, kind, response text): each example's right solution and all its flawed ones."""
    from megatron_selfjudge.data import prompts, synthetic

    out = []
    for i, ex in enumerate(examples):
        out.append((i, RIGHT, prompts.sft_target(ex)))
        for kind, reasoning, answer in synthetic.flawed_solutions(ex, np.random.default_rng([seed, 17, i])):
            out.append((i, kind, prompts.format_response(reasoning, answer)))
    return out


def auc(right: Sequence[float], flawed: Sequence[float]) -> Optional[float]:
    """P(a right candidate scores above a flawed one), ties counted half (Mann-Whitney); None if a side is empty."""
    if not right or not flawed:
        return None
    wins = sum((r > f) + 0.5 * (r == f) for r in right for f in flawed)
    return wins / (len(right) * len(flawed))


def summarize(kinds: Sequence[str], scores: Sequence[Optional[float]]) -> dict:
    """Per kind: candidates, unparsed verdicts, mean parsed score; and the right-vs-flawed AUC.

    An unparsed verdict counts 0 in the AUC (the trainer's judge.unparsed=zero) and is left out of the means.
    """
    per: dict[str, dict] = {}
    for kind, score in zip(kinds, scores):
        row = per.setdefault(kind, {"candidates": 0, "unparsed": 0, "scores": []})
        row["candidates"] += 1
        if score is None:
            row["unparsed"] += 1
        else:
            row["scores"].append(score)
    table = {kind: {"candidates": r["candidates"], "unparsed": r["unparsed"],
                    "mean_score": sum(r["scores"]) / len(r["scores"]) if r["scores"] else None}
             for kind, r in sorted(per.items())}
    as_zero = [0.0 if s is None else s for s in scores]
    right = [s for k, s in zip(kinds, as_zero) if k == RIGHT]
    flawed = [s for k, s in zip(kinds, as_zero) if k != RIGHT]
    return {"kinds": table, "auc_right_vs_flawed": auc(right, flawed)}


def run(args: argparse.Namespace) -> dict:
    """Load the checkpoint, grade every candidate through the generative Judge, return the summary."""
    import torch

    from megatron_selfjudge.data.synthetic import make_synthetic_splits
    from megatron_selfjudge.judges import GenerativeJudge, JudgePrompt
    from megatron_selfjudge.rollout.base import Trajectory, build_engine_for
    from megatron_selfjudge.runtime.console import Console
    from megatron_selfjudge.runtime.trained_policy import load_policy, load_run_config, locate, single_process
    from megatron_selfjudge.trainer import encode_prompt

    where = locate(args.checkpoint)
    cfg = load_run_config(where)
    d, j = cfg.data, cfg.judge
    if d.train != "synthetic":
        raise ValueError(f"{where.config_file}: data.train is {d.train!r}; this check needs the synthetic task")
    examples = make_synthetic_splits(d.synthetic_seed, d.synthetic_sft, d.synthetic_unlabeled, d.synthetic_test,
                                     image_size=cfg.model.image_size, families=tuple(d.synthetic_families))["test"]
    examples = examples[:args.limit] if args.limit else examples
    cands = candidates(examples, args.seed)
    log = Console(True)
    with single_process(args.seed):
        policy = load_policy(where, cfg, log.info)
        engine = build_engine_for(j.backend or cfg.rollout.backend, cfg, model=policy.module,
                                  tokenizer=policy.family.tokenizer, max_batch_size=cfg.rollout.max_batch_size)
        fam = policy.family

        def encode(text: str, n: int, images=None) -> list[int]:  # as the trainer's Judge encodes its prompts
            return encode_prompt(cfg, fam, text, n, instruction="", limit_key="judge.max_prompt_len", images=images)

        # Greedy by default: the Judge's best reading, without sampling noise.
        judge = GenerativeJudge(engine, encode, samples=1, temperature=args.temperature or 1.0, top_p=j.top_p,
                                max_tokens=j.max_tokens, seed=args.seed, rubric=j.rubric, greedy=not args.temperature)
        images = [fam.images([ex.image]) for ex in examples]
        scores: list[Optional[float]] = []
        step = max(1, cfg.rollout.max_batch_size)
        with log.progress("judge check", -(-len(cands) // step), 0) as advance:
            for start in range(0, len(cands), step):
                chunk = cands[start:start + step]
                prompts = [JudgePrompt(uid=f"c{start + k}", question=examples[i].question, images=images[i],
                                       source_images=[examples[i].image])
                           for k, (i, _, _) in enumerate(chunk)]
                # Only the text of a candidate reaches the Judge's prompt.
                trajs = [Trajectory(uid=p.uid, sample_index=0, prompt_ids=[], response_ids=[],
                                    logprobs=torch.zeros(0), finish_reason="stop", text=text)
                         for p, (_, _, text) in zip(prompts, chunk)]
                parsed, _ = judge.score(prompts, trajs)
                scores += [row[0] for row in parsed]
                advance(f"{len(scores)} graded")
        engine.close()
    summary = summarize([k for _, k, _ in cands], scores)
    summary.update(checkpoint=str(policy.checkpoint), rubric=j.rubric, problems=len(examples),
                   greedy=not args.temperature, seed=args.seed)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; bad input gives one line on stderr and exit code 2."""
    from megatron_selfjudge.config import ConfigError
    from megatron_selfjudge.runtime.trained_policy import PolicyLoadError

    p = argparse.ArgumentParser(prog="python -m megatron_selfjudge.eval.judge_check", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a run directory, or a checkpoint folder such as checkpoints/initial")
    p.add_argument("--limit", type=int, default=0, help="first N held-out problems (0: all)")
    p.add_argument("--temperature", type=float, default=0.0, help="sample the verdicts at this temperature (0: greedy)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="also write the summary here as JSON")
    args = p.parse_args(argv)
    if args.limit < 0 or args.temperature < 0:
        print("judge_check: --limit and --temperature must be >= 0", file=sys.stderr)
        return 2
    # torch.distributed.checkpoint's deprecation notices on every weights load say nothing about this check.
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        summary = run(args)
    except (ValueError, ConfigError, PolicyLoadError, FileNotFoundError) as exc:
        print(f"judge_check: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
