"""The recipe: supervised warm start, then label-free GRPO, top to bottom.

One UPT step (`Trainer.upt_step`) reads in order:
    this rank's share of the prompts -> rollouts (G per prompt) -> old / reference log-probs
    -> Judge scores -> rewards (reward.mode, on the extracted answers) -> advantages
    (advantage.estimator) -> mini-batch updates -> weight sync (rollout/weight_sync.py)
Each arrow is a call into a component (rollout engine, judges, rewards, advantages,
megatron forward / train_step) with a typed batch in and out. The reference log-probs come
before the Judge because the likelihood Judge reuses them at temperature 1. The in-process
megatron engine shares the policy's weights, so its weight sync only records the version.

Stage 1 (optional, `trainer.sft_steps`) fine-tunes on the labelled warm-start split; its
gradient is the policy-gradient step with advantage 1 on the target tokens (on-policy ratio
1, no KL), which is exactly the gradient of the token-mean negative log-likelihood. The
reference model and the Judge are then one frozen copy of this initial policy.

Multi-process runs (torchrun): every rank draws the same prompts, and each data-parallel rank
keeps its share of them (its part of every mini-batch, a prompt's G samples together,
`batching.prompt_shard`), then generates, judges, rewards and computes log-probs for those rows
only. Samples are seeded per request and sample index, so a DP=2 run samples and trains what a
DP=1 run does; only the loss normaliser and the logged metrics cross ranks.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from megatron_selfjudge.config import Config, uses_generative_judge, uses_judge
from megatron_selfjudge.data.task import load_task
from megatron_selfjudge.megatron import optimizer as optim
from megatron_selfjudge.metrics import MetricsWriter
from megatron_selfjudge.preemption import PreemptionHandler
from megatron_selfjudge.runtime.console import Console
from megatron_selfjudge.runtime.setup import is_main_rank, seed_everything, setup_distributed, teardown_distributed


def config_value(cfg: Config, key: str):
    """The value of a dotted config key, e.g. "rollout.max_prompt_len"."""
    return functools.reduce(getattr, key.split("."), cfg)


def encode_prompt(cfg: Config, family, question: str, n_images: int, instruction: Optional[str] = None,
                  limit_key: str = "rollout.max_prompt_len", images=None) -> list[int]:
    """Prompt token ids in the model family's format (question, instruction, image placeholders), length-checked.

    instruction None: data.instruction's text. `images` (the family's preprocessed images) size the
    placeholders of families whose processor writes one token per image embedding
    (ModelFamily.expand_images). A prompt longer than the config key `limit_key` raises ValueError.
    """
    from megatron_selfjudge.data import prompts

    text_instruction = prompts.get_instruction(cfg.data.instruction) if instruction is None else instruction
    ids = family.prompt_ids(question, n_images, text_instruction)
    if images is not None:
        ids = family.expand_images(ids, images)
    limit = config_value(cfg, limit_key)
    if len(ids) > limit:
        raise ValueError(f"prompt of {len(ids)} tokens exceeds {limit_key}={limit}: {question[:80]!r}")
    return ids


def reduce_step_monitors(values: dict) -> dict:
    """A step's per-rank metrics reduced over the data-parallel ranks, the same on every rank: means,
    except the counts (judge_unparsed) and the monitors' sums and row counts, which are summed and
    then divided into judge_score_* and gt_acc / pseudo_label_acc (rewards/combine.py). Every rank
    must hold the same keys: the reduction packs them into one all-reduce."""
    from megatron_selfjudge.megatron.parallel import mean_over_data_parallel
    from megatron_selfjudge.rewards.combine import (JUDGE_MONITOR_SUMS, LABEL_MONITOR_SUMS, judge_monitor_means,
                                                     label_monitor_means)

    out = mean_over_data_parallel(values, sums=("judge_unparsed", *JUDGE_MONITOR_SUMS, *LABEL_MONITOR_SUMS))
    return label_monitor_means(judge_monitor_means(out))


class Trainer:
    """Holds the run's components; `run()` executes SFT, evaluation, UPT steps, evaluation."""

    def __init__(self, cfg: Config):
        from megatron_selfjudge.megatron.models.family import build_family
        from megatron_selfjudge.megatron.optimizer import build_optimizer
        from megatron_selfjudge.rollout.base import build_engine_for
        from megatron_selfjudge.rollout.weight_sync import WeightSync

        self.cfg = cfg
        self.main = is_main_rank()
        self.run_dir = Path(cfg.trainer.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.log = Console(self.main)
        self.task = load_task(cfg)
        self.family = build_family(cfg)  # tokenizer, prompts, images and the module builder
        self.tokenizer = self.family.tokenizer
        self.check_prompt_lengths()
        self.build = self.family.builder()
        self.policy = self.build()
        self.ddp, self.optimizer = build_optimizer(
            self.policy, cfg.optim,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer and optim.data_parallel_size() > 1)
        self.engine = build_engine_for(cfg.rollout.backend, cfg, model=self.policy, tokenizer=self.tokenizer,
                                       max_batch_size=cfg.rollout.max_batch_size)
        # An engine with its own weights (vLLM) is fed the family's HF-named export after every update.
        self.weight_sync = WeightSync(self.engine, None if self.engine.shares_weights else
                                      functools.partial(self.family.export_hf, self.policy))
        self.sampler = self.task.sampler(cfg.trainer.seed)
        # policy_version: optimizer updates of stage 2 so far; the rollout engine must hold this version.
        self.state: dict = {"phase": "sft", "sft_step": 0, "step": 0, "evals": {}, "skipped_steps": 0,
                            "policy_version": 0}
        self.initial = None  # FrozenModel: reference + Judge
        self.offload_frozen = cfg.trainer.offload_frozen and torch.cuda.is_available()
        self.metrics = MetricsWriter(self.run_dir, enabled=self.main)

    # ---- prompts and batches ----
    def encode(self, question: str, n_images: int, instruction: Optional[str] = None,
               limit_key: str = "rollout.max_prompt_len", images=None) -> list[int]:
        """Prompt token ids of this run (`encode_prompt` with its config and model family)."""
        return encode_prompt(self.cfg, self.family, question, n_images, instruction, limit_key, images)

    def encode_record(self, record, images=None) -> list[int]:
        """A record's prompt ids: a question with data.instruction, or a whole prompt of its kind
        (question-writing cues, Judge prompts of the warm start) with that kind's instruction and limit."""
        from megatron_selfjudge.data.task import PROMPT_KIND, PROMPT_KINDS

        kind = record.meta.get(PROMPT_KIND)
        instruction, limit_key = PROMPT_KINDS[kind] if kind else (None, "rollout.max_prompt_len")
        return self.encode(record.question, self.num_images(record), instruction=instruction, limit_key=limit_key,
                           images=images)

    def images_of(self, record) -> Optional[torch.Tensor]:
        """Preprocessed images of a record, as the model family wants them (None for a text-only policy)."""
        return self.family.images(record.images)

    def requests(self, records: Sequence) -> list:
        """Rollout requests (uid = record uid) for records."""
        from megatron_selfjudge.rollout.base import RolloutRequest

        out = []
        for r in records:
            images = self.images_of(r)
            # The source images too: an engine that runs the HF image processor itself (vLLM) reads them.
            out.append(RolloutRequest(uid=r.uid, prompt_ids=self.encode(r.question, self.num_images(r), images=images),
                                      images=images, metadata={"source_images": r.images} if images is not None else {}))
        return out

    def num_images(self, record) -> int:
        """Image placeholders in the record's prompt (0 for a text-only policy)."""
        return self.family.num_images(record.images)

    def check_prompt_lengths(self) -> None:
        """Refuse, before any training, a prompt over its limit (rollout.max_prompt_len, judge.max_prompt_len
        for warm-start Judge prompts) or a warm-start question / verdict longer than what may be generated
        (rollout.max_response_len, judge.max_tokens; data/task.TARGET_LIMITS). The message names file and row."""
        from megatron_selfjudge.data.collate import encode_response
        from megatron_selfjudge.data.datasets import DatasetError
        from megatron_selfjudge.data.task import PROMPT_KIND, TARGET_LIMITS

        # Streamed training files are read once more here, a row group at a time (no images decoded).
        records = itertools.chain(self.task.train, self.task.test, (rec for rec, _ in self.task.sft))
        for rec in records:
            try:
                self.encode_record(rec, images=self.images_of(rec))
            except ValueError as exc:
                raise DatasetError(f"{rec.source_file} row {rec.row}: {exc}") from None
        for rec, target in self.task.sft:
            key = TARGET_LIMITS.get(rec.meta.get(PROMPT_KIND))
            if key is None:  # a solution: a warm start may teach longer traces than the rollouts sample
                continue
            limit, n = config_value(self.cfg, key), len(encode_response(target, self.tokenizer))
            if n > limit:
                raise DatasetError(f"{rec.source_file} row {rec.row}: warm-start target of {n} tokens (with EOS) "
                                   f"exceeds {key}={limit}: {target[:80]!r}")

    def policy_batch(self, prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]],
                     images: Sequence[torch.Tensor], advantages: torch.Tensor):
        """Right-padded prompt+response sequences with a response-only loss mask."""
        from megatron_selfjudge.data.collate import build_sequences
        from megatron_selfjudge.megatron.batching import PolicyBatch

        seqs = build_sequences(prompt_ids, response_ids, self.tokenizer.pad_token_id)
        if not self.family.multimodal:
            return PolicyBatch.from_sequences(seqs, advantages.float())
        # A prompt's G rows pass the same image tensor: the batch holds it once.
        return PolicyBatch.sharing_images(seqs, advantages.float(), images)

    def scoring(self, temperature: float) -> dict:
        """Options of a forward-only log-prob pass over this rank's own rows (old, reference, likelihood Judge)."""
        return dict(temperature=temperature, max_tokens=self.cfg.trainer.micro_batch_tokens,
                    shard_data_parallel=False, impl=self.cfg.loss.impl)

    def loss_settings(self, sft: bool = False):
        """Loss hyper-parameters; SFT is the on-policy, KL-free special case with advantage 1."""
        from megatron_selfjudge.megatron.train_step import LossSettings

        lo = self.cfg.loss
        clip = dict(eps_low=lo.eps_low, eps_high=lo.eps_high, dual_clip=lo.dual_clip, impl=lo.impl)
        if sft:
            return LossSettings(temperature=1.0, beta_kl=0.0, agg="token-mean", entropy_coef=0.0, **clip)
        return LossSettings(temperature=self.cfg.rollout.temperature, beta_kl=lo.beta_kl, agg=lo.agg,
                            entropy_coef=lo.entropy_coef, **clip)

    # ---- evaluation ----
    def evaluate(self, name: str, should_stop: Optional[Callable[[], bool]] = None) -> Optional[dict]:
        """Greedy pass@1, sampled pass@1 and maj@G on the held-out split.

        `should_stop` is polled between generation batches (eval.heldout.EvalInterrupted).
        """
        from megatron_selfjudge.eval.heldout import evaluate

        if not self.task.test:
            return None
        r = self.cfg.rollout
        res = evaluate(self.engine, self.requests(self.task.test), [rec.answer for rec in self.task.test],
                       samples=r.n, temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_response_len,
                       seed=self.cfg.trainer.seed + 10_000, equivalence=self.cfg.reward.equivalence,
                       timeout=self.cfg.reward.symbolic_timeout, batch_size=r.max_batch_size,
                       should_stop=should_stop, progress=self.log.info)
        self.state["evals"][name] = res.as_dict()
        self.log.info(f"eval {name}: greedy {res.greedy_pass1:.3f}  sampled {res.sampled_pass1:.3f}  "
                      f"maj@{r.n} {res.maj_at_g:.3f}  boxed {res.format_ok:.3f}")
        return res.as_dict()

    def evaluate_benchmarks(self, step: int) -> dict:
        """trainer.eval_benchmarks on the live policy (eval/run.py); returns eval/<benchmark>/accuracy."""
        from megatron_selfjudge.eval.run import evaluate_in_training

        return evaluate_in_training(self, step)

    # ---- stage 2: one label-free GRPO step ----
    def judge_scores(self, records, trajectories, batch, ref_logp):
        """Per-trajectory lists of K Judge scores (None = unparseable), or None when the reward needs none."""
        from megatron_selfjudge.judges import GenerativeJudge, JudgePrompt, LikelihoodJudge

        if not uses_judge(self.cfg):
            return None
        if self.cfg.judge.kind == "likelihood":
            logp = ref_logp if self.cfg.rollout.temperature == 1.0 and ref_logp is not None else \
                self.initial.logprobs(batch, **self.scoring(temperature=1.0))
            return LikelihoodJudge().scores_from_logprobs(logp, batch.loss_mask)
        j = self.cfg.judge
        judge = GenerativeJudge(self.judge_engine,
                                lambda text, n, images=None: self.encode(text, n, instruction="",
                                                                         limit_key="judge.max_prompt_len", images=images),
                                samples=j.samples, temperature=j.temperature, top_p=j.top_p,
                                max_tokens=j.max_tokens, seed=self.cfg.trainer.seed + 20_000, rubric=j.rubric)
        prompts = [JudgePrompt(uid=r.uid, question=r.question, images=self.images_of(r),
                               source_images=r.images if self.family.multimodal else None) for r in records]
        scores, _ = judge.score(prompts, trajectories, step=self.state["step"])
        return scores

    def rewards(self, records, trajectories, judge_scores, response_stats=None, votes=()):
        """Rewards per reward.mode (random: the control run's Bernoulli(1/2) rewards).

        response_stats: the policy's per-response token statistics (self_certainty, neg_entropy);
        votes: the extra voting trajectories of a mode that votes (ttrl).
        """
        from megatron_selfjudge.rewards.combine import REWARD_MODES, compute_rewards

        rw = self.cfg.reward
        by_uid = {r.uid: r for r in records}
        texts = [t.text for t in trajectories]
        gids = [t.uid for t in trajectories]
        labels = [by_uid[t.uid].answer for t in trajectories]
        if rw.mode == "ground_truth" and any(lab is None for lab in labels):
            raise ValueError("reward.mode=ground_truth needs an answer for every training prompt")
        res = compute_rewards(texts, gids, rw.mode, judge_scores=judge_scores,
                              ground_truths=labels,  # None rows (unlabelled) are left out of the monitors
                              equivalence=rw.equivalence, consistency_gate=rw.consistency_gate,
                              format_penalty=rw.format_penalty, calibration=rw.calibration,
                              unparsed_policy=self.cfg.judge.unparsed, timeout=rw.symbolic_timeout,
                              seed=self.cfg.trainer.seed * 1_000_003 + self.state["step"],
                              agreement_gamma=rw.agreement_gamma, response_stats=response_stats,
                              **({"votes": [v.text for v in votes], "vote_group_ids": [v.uid for v in votes]}
                                 if REWARD_MODES[rw.mode].needs_votes else {}))
        return res.as_tensor(), res

    def upt_step(self) -> dict:
        """This rank's share of the step's prompts -> rollouts -> old/ref log-probs -> Judge -> rewards
        -> advantages -> mini-batch updates -> weight sync; returns the step's metrics over all ranks.

        Every rank draws the same prompts; each data-parallel rank keeps its share (its part of every
        mini-batch, a prompt's G samples together) and does everything else for those rows only.
        Only the loss normaliser (inside the update) and the logged metrics cross ranks.
        """
        from megatron.core import parallel_state

        from megatron_selfjudge.advantages import compute_advantages
        from megatron_selfjudge.megatron.batching import prompt_shard
        from megatron_selfjudge.megatron.forward import compute_logprobs
        from megatron_selfjudge.megatron.parallel import max_over_data_parallel
        from megatron_selfjudge.megatron.train_step import train_on_rollout
        from megatron_selfjudge.rewards.baselines import response_stats
        from megatron_selfjudge.rewards.combine import REWARD_MODES
        from megatron_selfjudge.rollout.base import SamplingConfig

        cfg, t, r = self.cfg, self.cfg.trainer, self.cfg.rollout
        t0 = time.perf_counter()
        drawn = self.task.draw(self.sampler.next(t.prompts_per_step))
        mine = prompt_shard(len(drawn), t.mini_batch_prompts, parallel_state.get_data_parallel_rank(),
                            optim.data_parallel_size())
        records = [drawn[i] for i in mine]
        requests = self.requests(records)
        self.weight_sync.ensure_current(self.state["policy_version"])
        mode = REWARD_MODES[cfg.reward.mode]
        # One seed per step; each sample's stream is keyed by it, its prompt's uid and its index, so
        # a voting mode's first rollout.n samples are the ones a non-voting run draws.
        drawn_trajs = self.engine.generate(requests, SamplingConfig(
            n=r.vote_n if mode.needs_votes else r.n, temperature=r.temperature, top_p=r.top_p,
            max_new_tokens=r.max_response_len, seed=t.seed * 7919 + self.state["step"]))
        trajs = [x for x in drawn_trajs if x.sample_index < r.n]
        votes = [x for x in drawn_trajs if x.sample_index >= r.n]
        t_roll = time.perf_counter()
        req_by_uid = {q.uid: q for q in requests}
        # Advantages are filled in once the rewards are known (the likelihood Judge needs the batch).
        batch = self.policy_batch([x.prompt_ids for x in trajs], [x.response_ids for x in trajs],
                                  [req_by_uid[x.uid].images for x in trajs], torch.zeros(len(trajs)))
        mb = t.micro_batch_tokens
        old = compute_logprobs(self.ddp, batch, **self.scoring(r.temperature), token_stats=mode.needs_token_stats)
        stats = None
        if mode.needs_token_stats:  # the same forward pass gives the token statistics of these rewards
            stats = response_stats(old.entropy, old.self_certainty, batch.loss_mask)
            old = old.logp
        # At temperature 1 the reference log-probs are also the likelihood Judge's: compute once.
        judge_reuses_ref = (uses_judge(cfg) and cfg.judge.kind == "likelihood"
                            and r.temperature == 1.0)
        with self.initial.use():  # on GPU the frozen copy is in host memory except here
            ref = self.initial.logprobs(batch, **self.scoring(r.temperature)) \
                if cfg.loss.beta_kl > 0 or judge_reuses_ref else None
            scores = self.judge_scores(records, trajs, batch, ref)
        rewards, res = self.rewards(records, trajs, scores, stats, votes)
        gids = [x.uid for x in trajs]
        a = cfg.advantage
        adv = compute_advantages(rewards, gids, a.estimator, temperature=a.temperature, center=a.center, eps=a.eps)
        batch.advantages = adv
        batch = batch.with_logprobs(old, ref if cfg.loss.beta_kl > 0 else None)
        mismatch = self.rollout_mismatch(batch, trajs)
        t_prep = time.perf_counter()
        self.weight_sync.release()  # GPU: the rollout engine's memory is free during the update
        history = train_on_rollout(self.ddp, self.optimizer, batch, self.loss_settings(), group_ids=gids,
                                   prompts_per_mini_batch=t.mini_batch_prompts, max_tokens=mb, local=True)
        t_upd = time.perf_counter()
        self.state["policy_version"] += len(history)
        synced = self.weight_sync.push(self.state["policy_version"])
        lengths = torch.tensor([len(x.response_ids) for x in trajs], dtype=torch.float32)
        out = reduce_step_monitors({
            **res.metrics(), "reward_mean": float(rewards.mean()), "adv_mean": float(adv.mean()),
            "response_len_mean": float(lengths.mean()),
            "stop_frac": sum(x.finish_reason == "stop" for x in trajs) / len(trajs),
            "adv_sq_mean": float((adv.double() ** 2).mean()),
            "rollouts_per_rank": float(len(trajs)),  # equal on every rank: P * G / dp
            **mismatch,
        })
        out["rollout_logp_diff_max"] = max_over_data_parallel(mismatch["rollout_logp_diff_max"])
        # The standard deviation of all ranks' advantages (unbiased, as torch.std of the whole batch).
        n_all = len(trajs) * optim.data_parallel_size()
        var = max(out.pop("adv_sq_mean") - out["adv_mean"] ** 2, 0.0) * n_all / max(n_all - 1, 1)
        out["adv_std"] = math.sqrt(var) if n_all > 1 else 0.0
        for key in ("loss", "kl", "clip_frac", "entropy", "grad_norm", "ratio_min", "ratio_max", "pg_loss"):
            vals = [h[key] for h in history if key in h and not h.get("skipped")]
            out[key] = None  # every update of the step was skipped
            if vals:
                out[key] = min(vals) if key == "ratio_min" else max(vals) if key == "ratio_max" \
                    else sum(vals) / len(vals)
        out["skipped_updates"] = float(sum(h.get("skipped", 0.0) for h in history))
        out.update(time_rollout=t_roll - t0, time_prepare=t_prep - t_roll, time_update=t_upd - t_prep, **synced)
        return out

    def close_engines(self) -> None:
        """Close the rollout engine and the Judge's (the same object when shared)."""
        for engine in {id(e): e for e in (self.engine, getattr(self, "judge_engine", None)) if e is not None}.values():
            engine.close()

    def rollout_mismatch(self, batch, trajs) -> dict:
        """Rollout engine vs trainer log-probs of the same tokens (logged), and the loss.rollout_correction
        weights put on `batch` (none: no weights)."""
        from megatron_selfjudge.loss import rollout_correction_weights, rollout_mismatch

        mask = batch.loss_mask.bool()
        rollout = torch.zeros_like(batch.old_logp)
        # Each row's masked positions are its response tokens in order (data.collate.build_sequences).
        rollout[mask] = torch.cat([x.logprobs for x in trajs]).to(rollout)
        lo = self.cfg.loss
        batch.rollout_weight = rollout_correction_weights(batch.old_logp, rollout, mask, lo.rollout_correction,
                                                          lo.rollout_correction_cap)
        out = rollout_mismatch(batch.old_logp, rollout, mask)
        if batch.rollout_weight is not None:
            out["rollout_weight_mean"] = float(batch.rollout_weight[mask].mean())
        return out

    # ---- run state (runtime/run_state.py) ----
    def save(self) -> None:
        """Policy + optimizer + RNG + trainer state (incl. the data cursor) under checkpoints/."""
        from megatron_selfjudge.megatron.checkpoint import save_checkpoint

        self.state["sampler"] = self.sampler.state()
        save_checkpoint(self.ckpt_root, self.state["step"], self.ddp, self.optimizer, dict(self.state),
                        keep_last=self.cfg.trainer.keep_checkpoints)
        self.log.info(f"checkpoint saved at step {self.state['step']}")

    def resume(self) -> bool:
        """Load the newest intact checkpoint (trainer.resume=auto); True if one was found.

        A damaged checkpoint is reported and the next older one tried; a folder whose step
        checkpoints are all unusable is refused (runtime.run_state).
        """
        from megatron_selfjudge.runtime.run_state import resume_newest

        if self.cfg.trainer.resume != "auto":
            return False
        found = resume_newest(self.ckpt_root, self.ddp, self.optimizer, self.log.info)
        if found is None:
            return False
        path, self.state = found
        self.state.setdefault("policy_version", 0)
        self.sampler = self.task.sampler(self.cfg.trainer.seed, self.state["sampler"])
        self.log.info(f"resumed from {path} (step {self.state['step']}, phase {self.state['phase']})")
        return True

    def load_warm_start(self) -> None:
        """Policy weights from trainer.init_from (a run directory's newest checkpoint, or a checkpoint folder); SFT is skipped."""
        from megatron_selfjudge.config import ConfigError
        from megatron_selfjudge.megatron.checkpoint import META_FILE, latest_checkpoint, load_checkpoint

        source = Path(self.cfg.trainer.init_from)
        path = latest_checkpoint(source / "checkpoints") if (source / "checkpoints").is_dir() else source
        if path is None or not (path / META_FILE).is_file():
            raise ConfigError(f"trainer.init_from={str(source)!r} is neither a run directory with a complete "
                              "checkpoint nor a checkpoint folder")
        with torch.random.fork_rng(devices=[]):  # the run's own RNG streams start as without init_from
            load_checkpoint(path, self.ddp, None, load_rng=False)
        self.state["phase"] = "upt"
        self.log.info(f"warm start: policy weights from {path} (trainer.init_from; SFT skipped)")

    def make_initial_copy(self, from_disk: bool) -> None:
        """Reference + Judge: one frozen copy of the policy as it enters stage 2 (and the Judge's engine)."""
        from megatron_selfjudge.rollout.base import build_engine_for
        from megatron_selfjudge.runtime.run_state import initial_copy

        self.initial = initial_copy(self.ckpt_root / "initial", self.policy, self.build, from_disk=from_disk,
                                    step=self.state["step"], offload=self.offload_frozen)
        if not uses_generative_judge(self.cfg):
            return
        if self.cfg.judge.share_engine:
            self.judge_engine = self.engine  # configured: the Judge samples from the policy's engine
            return
        # The Judge's engine is loaded once from the frozen initial weights and never synced.
        self.judge_engine = build_engine_for(self.cfg.judge.backend or self.cfg.rollout.backend, self.cfg,
                                             model=self.initial.module, tokenizer=self.tokenizer,
                                             max_batch_size=self.cfg.rollout.max_batch_size)
        if not self.judge_engine.shares_weights:
            # Built from the HF folder; the frozen copy may differ from it (after SFT): load it, once.
            with self.initial.use():
                self.judge_engine.update_weights(self.family.export_hf(self.initial.module), 0)

    # ---- the run ----
    def total_steps(self) -> int:
        """trainer.max_steps, or trainer.epochs passes over the unlabeled prompts."""
        t = self.cfg.trainer
        if t.max_steps >= 0:
            return t.max_steps
        return t.epochs * (len(self.task.train) // t.prompts_per_step)

    def run(self, preempt: Optional[PreemptionHandler] = None) -> int:
        """SFT -> eval before -> UPT steps (checkpointed, preemptible) -> eval after -> table.

        A stop signal (SIGTERM/SIGUSR1) is honoured within one SFT step, one UPT step or one
        generation batch of an evaluation: the run saves a checkpoint and returns 0. An
        interrupted evaluation is not recorded, so the resumed run repeats it. `preempt` is the
        caller's handler (trainer.main installs one before building anything); else run() installs one.
        """
        from megatron_selfjudge import sft
        from megatron_selfjudge.eval.heldout import EvalInterrupted
        from megatron_selfjudge.runtime.run_state import check_saved_config, write_saved_config

        t = self.cfg.trainer
        check_saved_config(self.run_dir, self.cfg, self.main, self.log.info)
        # Inside stage 2 the frozen copy comes from disk: load it before anything is written, so a
        # missing or damaged copy is refused with the run directory untouched.
        resumed = self.resume()
        in_stage2 = resumed and self.state["step"] > 0
        if in_stage2:
            self.make_initial_copy(from_disk=True)
        if not resumed and t.init_from:
            self.load_warm_start()
        write_saved_config(self.run_dir, self.cfg, self.main)
        if self.task.skipped:
            self.log.info(f"data: skipped {self.task.skipped} unusable rows (data.on_error=skip)")
        with PreemptionHandler() if preempt is None else contextlib.nullcontext(preempt) as preempt:
            def stopped_in_eval(name: str) -> bool:
                """Run evaluation `name`; True when a stop signal interrupted it (a checkpoint is saved)."""
                try:
                    self.evaluate(name, should_stop=preempt.should_stop)
                    return False
                except EvalInterrupted:
                    self.save()
                    self.log.info(f"preempted during evaluation {name!r}: saved step {self.state['step']} and "
                                  "exiting (the evaluation runs again on resume)")
                    self.metrics.close()
                    return True

            if self.state["phase"] == "sft" and sft.run_sft(self, preempt):
                self.log.info(f"preempted during SFT: saved SFT step {self.state['sft_step']} and exiting")
                self.metrics.close()
                return 0
            if not in_stage2:
                self.make_initial_copy(from_disk=False)
            self.weight_sync.push(self.state["policy_version"])  # the weights stage 2 (re)starts from
            if "before" not in self.state["evals"] and stopped_in_eval("before"):
                return 0
            # Lines of steps after the checkpoint (a killed run's) are written again below.
            self.metrics.truncate_after(self.state["step"])
            total = self.total_steps()
            with self.log.progress("UPT steps", total, self.state["step"]) as advance:
                while self.state["step"] < total:
                    m = self.upt_step()
                    self.state["step"] += 1
                    if m.get("skipped_updates"):
                        self.state["skipped_steps"] += int(m["skipped_updates"])
                        self.log.info(f"warning: step {self.state['step']}: {int(m['skipped_updates'])} "
                                      "update(s) skipped (non-finite loss or gradient); weights untouched")
                    if t.eval_every and (self.state["step"] % t.eval_every == 0 or self.state["step"] == total):
                        m.update(self.evaluate_benchmarks(self.state["step"]))  # same line: accuracy per step
                    self.metrics.log(self.state["step"], m)
                    entropy = m.get("entropy")
                    advance(f"reward {m['reward_mean']:.3f} len {m['response_len_mean']:.1f} "
                            f"ent {float('nan') if entropy is None else entropy:.3f}")
                    step = self.state["step"]
                    if preempt.should_stop():
                        self.save()
                        self.log.info(f"preempted: saved step {step} and exiting")
                        self.metrics.close()
                        return 0
                    if t.save_every and step % t.save_every == 0 and step < total:
                        self.save()
            self.state["phase"] = "done"
            if stopped_in_eval("after"):
                return 0
            self.save()
            # Still inside the handler: a stop signal from here on has nothing left to save.
            self.write_report()
            self.metrics.close()
        return 0

    def write_report(self) -> None:
        """results.json and results.md (before/after table) in the run directory."""
        from megatron_selfjudge.eval.heldout import EvalResult, format_table

        if not self.main:
            return
        evals = self.state["evals"]
        (self.run_dir / "results.json").write_text(json.dumps(
            {"reward_mode": self.cfg.reward.mode, "estimator": self.cfg.advantage.estimator,
             "steps": self.state["step"], "skipped_steps": self.state["skipped_steps"], "evals": evals}, indent=2))
        if evals:
            table = format_table({k: EvalResult(**v) for k, v in evals.items()})
            (self.run_dir / "results.md").write_text(
                f"reward.mode={self.cfg.reward.mode}, advantage.estimator={self.cfg.advantage.estimator}, "
                f"{self.state['step']} steps\n\n{table}\n")
            self.log.info("\n" + table)


def main(cfg: Config) -> int:
    """Run training as configured; returns a process exit code."""
    from megatron_selfjudge.runtime import preflight
    from megatron_selfjudge.runtime.children import guard_children
    from megatron_selfjudge.runtime.faults import sigterm_point
    from megatron_selfjudge.runtime.lock import hold_run_dir

    # Config against the platform, before any collective: every rank refuses alike, in seconds
    # (before guard_children, which imports megatron-core's checkpoint machinery).
    checked = preflight.check_launch(cfg)
    guard_children()  # checkpoint writers and other helpers die with this process
    # From here to the end a stop signal is a request: honoured at the run's next check (or, once
    # everything is saved, simply the end of the run), never a kill in the middle of a write.
    with PreemptionHandler() as preempt:
        created = setup_distributed(cfg.parallel.tp, cfg.parallel.pp, cfg.trainer.seed)
        seed_everything(cfg.trainer.seed)
        try:
            preflight.check_ranks(cfg, checked)  # data, run directory, memory: one rank's failure stops all
            log = Console(is_main_rank())
            for line in checked.summary():
                log.info(line)
            # Locked before anything is written there (the Trainer opens TensorBoard, run() config.yaml).
            with hold_run_dir(cfg.trainer.run_dir, is_main_rank()):
                trainer = Trainer(cfg)
                try:
                    return trainer.run(preempt)
                finally:
                    trainer.close_engines()  # before the process groups go: a vLLM engine tears down its own
        finally:
            sigterm_point("teardown")
            teardown_distributed(created)
