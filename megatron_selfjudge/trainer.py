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

import json
import math
import os
import random
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from megatron_selfjudge.config import Config, to_yaml, uses_generative_judge
from megatron_selfjudge.megatron import optimizer as optim
from megatron_selfjudge.metrics import MetricsWriter



# --- process / rank set-up ------------------------------------------------------------------

def free_port() -> int:
    """A TCP port on loopback that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(cfg: Config) -> bool:
    """Join (or, for a plain `selfjudge train`, create) the process group and megatron's groups.

    Returns True when this call created a one-rank group that the caller should destroy.
    """
    import torch.distributed as dist

    from megatron_selfjudge.megatron.parallel import initialize_parallel

    created = False
    if not dist.is_initialized() and "WORLD_SIZE" not in os.environ:
        # Single process: a one-rank group on loopback, so the code path is the torchrun one.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
        created = True
    initialize_parallel(cfg.parallel.tp, cfg.parallel.pp, seed=cfg.trainer.seed)
    return created


def is_main_rank() -> bool:
    """Global rank 0 writes files and prints."""
    import torch.distributed as dist

    return not dist.is_initialized() or dist.get_rank() == 0


def seed_everything(seed: int) -> None:
    """Python, numpy and torch RNGs (megatron's tracker is seeded by initialize_parallel)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- data -----------------------------------------------------------------------------------

@dataclass
class Task:
    """Prompts of the run: unlabeled training prompts, optional SFT pairs, held-out test prompts."""

    train: list  # PromptRecord
    test: list
    sft: list = field(default_factory=list)  # (PromptRecord, target response text)
    skipped: int = 0


def load_task(cfg: Config) -> Task:
    """The embedded synthetic task, or local files in the published schemas."""
    from megatron_selfjudge.data import datasets, prompts, synthetic

    d = cfg.data
    if d.train == "synthetic":
        splits = synthetic.make_synthetic_splits(
            seed=d.synthetic_seed, n_sft=d.synthetic_sft, n_unlabeled=d.synthetic_unlabeled,
            n_test=d.synthetic_test, image_size=cfg.model.image_size, families=tuple(d.synthetic_families))
        sft = list(zip(datasets.examples_to_records(splits["train_sft"], "synthetic:train_sft"),
                       [prompts.sft_target(ex) for ex in splits["train_sft"]]))
        return Task(train=datasets.examples_to_records(splits["train_unlabeled"], "synthetic:train_unlabeled"),
                    test=datasets.examples_to_records(splits["test"], "synthetic:test"), sft=sft)
    limits = datasets.ImageLimits.from_config(d, image_size=cfg.model.image_size)
    train = datasets.load_records(d.train, on_error=d.on_error, limits=limits)
    test = (datasets.load_records(d.eval, on_error=d.on_error, require_answer=True, limits=limits)
            if d.eval else None)
    skipped = train.skipped + (test.skipped if test else 0)
    if not train.records:
        raise datasets.DatasetError(f"data.train: {d.train!r} holds no usable rows ({train.skipped} skipped)")
    return Task(train=list(train.records), test=list(test.records) if test else [], skipped=skipped)


class PromptSampler:
    """Epoch-wise shuffled order over the training prompts; its cursor is checkpointed."""

    def __init__(self, num: int, seed: int, epoch: int = 0, offset: int = 0):
        if num < 1:
            raise ValueError("the training set is empty")
        self.num, self.seed, self.epoch, self.offset = num, seed, epoch, offset

    def _order(self, epoch: int) -> list[int]:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num).tolist()

    def next(self, k: int) -> list[int]:
        """The next k indices of this epoch's order; a remainder shorter than k is dropped
        (as DataLoader's drop_last), so a step never holds the same prompt twice."""
        if k > self.num:
            raise ValueError(f"trainer.prompts_per_step={k} exceeds the {self.num} training prompts")
        if self.offset + k > self.num:
            self.epoch, self.offset = self.epoch + 1, 0
        out = self._order(self.epoch)[self.offset:self.offset + k]
        self.offset += k
        return out

    def state(self) -> dict:
        """JSON-able cursor."""
        return {"epoch": self.epoch, "offset": self.offset}


# --- the trainer ----------------------------------------------------------------------------

class Trainer:
    """Holds the run's components; `run()` executes SFT, evaluation, UPT steps, evaluation."""

    def __init__(self, cfg: Config):
        from megatron_selfjudge.megatron.models.family import build_family
        from megatron_selfjudge.megatron.optimizer import build_optimizer
        from megatron_selfjudge.rollout.base import build_engine
        from megatron_selfjudge.rollout.weight_sync import WeightSync

        self.cfg = cfg
        self.main = is_main_rank()
        self.run_dir = Path(cfg.trainer.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.log = _Printer(self.main)
        self.task = load_task(cfg)
        self.family = build_family(cfg)  # tokenizer, prompts, images and the module builder
        self.tokenizer = self.family.tokenizer
        self.check_prompt_lengths()
        self.build = self.family.builder()
        self.policy = self.build()
        o = cfg.optim
        self.ddp, self.optimizer = build_optimizer(
            self.policy, lr=o.lr, weight_decay=o.weight_decay, clip_grad=o.grad_clip, adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
            use_distributed_optimizer=cfg.parallel.use_distributed_optimizer and _dp_size() > 1)
        self.engine = build_engine(cfg.rollout.backend, model=self.policy, tokenizer=self.tokenizer,
                                   max_batch_size=cfg.rollout.max_batch_size)
        self.weight_sync = WeightSync(self.engine)
        self.sampler = PromptSampler(len(self.task.train), cfg.trainer.seed)
        # policy_version: optimizer updates of stage 2 so far; the rollout engine must hold this version.
        self.state: dict = {"phase": "sft", "sft_step": 0, "step": 0, "evals": {}, "skipped_steps": 0,
                            "policy_version": 0}
        self.initial = None  # FrozenModel: reference + Judge
        self.offload_frozen = cfg.trainer.offload_frozen and torch.cuda.is_available()
        self.metrics = MetricsWriter(self.run_dir, enabled=self.main)

    # ---- prompts and batches ----
    def encode(self, question: str, n_images: int, instruction: Optional[str] = None,
               limit_key: str = "rollout.max_prompt_len") -> list[int]:
        """Prompt token ids in the model family's format (question, instruction, image placeholders), length-checked."""
        from megatron_selfjudge.data import prompts

        text_instruction = prompts.get_instruction(self.cfg.data.instruction) if instruction is None else instruction
        ids = self.family.prompt_ids(question, n_images, text_instruction)
        section, key = limit_key.split(".")
        limit = getattr(getattr(self.cfg, section), key)
        if len(ids) > limit:
            raise ValueError(f"prompt of {len(ids)} tokens exceeds {limit_key}={limit}: {question[:80]!r}")
        return ids

    def images_of(self, record) -> Optional[torch.Tensor]:
        """Preprocessed images of a record, as the model family wants them (None for a text-only policy)."""
        return self.family.images(record.images)

    def requests(self, records: Sequence) -> list:
        """Rollout requests (uid = record uid) for records."""
        from megatron_selfjudge.rollout.base import RolloutRequest

        return [RolloutRequest(uid=r.uid, prompt_ids=self.encode(r.question, self.num_images(r)),
                               images=self.images_of(r)) for r in records]

    def num_images(self, record) -> int:
        """Image placeholders in the record's prompt (0 for a text-only policy)."""
        return self.family.num_images(record.images)

    def check_prompt_lengths(self) -> None:
        """Refuse, before any training, a prompt longer than rollout.max_prompt_len (names file and row)."""
        from megatron_selfjudge.data.datasets import DatasetError

        records = self.task.train + self.task.test + [rec for rec, _ in self.task.sft]
        for rec in records:
            try:
                self.encode(rec.question, self.num_images(rec))
            except ValueError as exc:
                raise DatasetError(f"{rec.source_file} row {rec.row}: {exc}") from None

    def policy_batch(self, prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]],
                     images: Sequence[torch.Tensor], advantages: torch.Tensor):
        """Right-padded prompt+response sequences with a response-only loss mask."""
        from megatron_selfjudge.data.collate import build_sequences
        from megatron_selfjudge.megatron.batching import PolicyBatch

        seqs = build_sequences(prompt_ids, response_ids, self.tokenizer.pad_token_id)
        if not self.family.multimodal:
            return PolicyBatch.from_sequences(seqs, advantages.float())
        return PolicyBatch.from_sequences(seqs, advantages.float(), images=torch.cat(list(images)),
                                          num_images=torch.tensor([im.shape[0] for im in images]))

    def loss_settings(self, sft: bool = False):
        """Loss hyper-parameters; SFT is the on-policy, KL-free special case with advantage 1."""
        from megatron_selfjudge.megatron.train_step import LossSettings

        lo = self.cfg.loss
        clip = dict(eps_low=lo.eps_low, eps_high=lo.eps_high, dual_clip=lo.dual_clip, impl=lo.impl)
        if sft:
            return LossSettings(temperature=1.0, beta_kl=0.0, agg="token-mean", entropy_coef=0.0, **clip)
        return LossSettings(temperature=self.cfg.rollout.temperature, beta_kl=lo.beta_kl, agg=lo.agg,
                            entropy_coef=lo.entropy_coef, **clip)

    # ---- stage 1: supervised warm start ----
    def sft_step(self, with_nll: bool) -> dict:
        """One supervised step on a batch of labelled (prompt, target) pairs.

        with_nll adds the batch's pre-update NLL (an extra forward pass, so only on logged steps).
        """
        from megatron_selfjudge.data.collate import encode_response
        from megatron_selfjudge.megatron.forward import compute_logprobs
        from megatron_selfjudge.megatron.train_step import train_step

        t = self.cfg.trainer
        rng = np.random.default_rng([t.seed, 7, self.state["sft_step"]])
        picks = rng.choice(len(self.task.sft), size=min(t.sft_batch_size, len(self.task.sft)), replace=False)
        recs = [self.task.sft[i][0] for i in picks]
        batch = self.policy_batch([self.encode(r.question, self.num_images(r)) for r in recs],
                                  [encode_response(self.task.sft[i][1], self.tokenizer) for i in picks],
                                  [self.images_of(r) for r in recs], torch.ones(len(recs)))
        out = {}
        if with_nll:
            logp = compute_logprobs(self.ddp, batch, temperature=1.0, max_tokens=t.micro_batch_tokens)
            out["sft_nll"] = float(-(logp.sum() / batch.loss_mask.sum()))
        m = train_step(self.ddp, self.optimizer, batch, self.loss_settings(sft=True), max_tokens=t.micro_batch_tokens)
        return {**out, "grad_norm": m["grad_norm"]}

    def run_sft(self, preempt) -> bool:
        """Stage 1 at optim.sft_lr, then a fresh optimizer state at optim.lr for stage 2.

        Returns True when a preemption signal stopped it (a checkpoint was saved).
        """
        t = self.cfg.trainer
        if not self.task.sft or t.sft_steps == 0:
            self.state["phase"] = "upt"
            return False
        optim.set_lr(self.optimizer, self.cfg.optim.sft_lr)
        self.metrics.truncate_after(self.state["sft_step"], prefix="sft")
        with self.log.progress("SFT warm start", t.sft_steps, self.state["sft_step"]) as advance:
            log_every = max(1, t.sft_steps // 10)
            nll = float("nan")
            while self.state["sft_step"] < t.sft_steps:
                logged = (self.state["sft_step"] + 1) % log_every == 0
                m = self.sft_step(with_nll=logged)
                self.state["sft_step"] += 1
                if logged:
                    nll = m["sft_nll"]
                    self.metrics.log(self.state["sft_step"], m, prefix="sft")
                advance(f"nll {nll:.3f}")
                if preempt.should_stop():
                    self.save()
                    return True
        optim.reset_optimizer_state(self.optimizer)
        optim.set_lr(self.optimizer, self.cfg.optim.lr)
        self.state["phase"] = "upt"
        return False

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

    # ---- stage 2: one label-free GRPO step ----
    def judge_scores(self, records, trajectories, batch, ref_logp):
        """Per-trajectory lists of K Judge scores (None = unparseable), or None when the reward needs none."""
        from megatron_selfjudge.judges import GenerativeJudge, JudgePrompt, LikelihoodJudge

        if self.cfg.reward.mode not in ("judge", "judge_raw"):
            return None
        if self.cfg.judge.kind == "likelihood":
            logp = ref_logp if self.cfg.rollout.temperature == 1.0 and ref_logp is not None else \
                self.initial.logprobs(batch, temperature=1.0, max_tokens=self.cfg.trainer.micro_batch_tokens,
                                      shard_data_parallel=False)
            return LikelihoodJudge().scores_from_logprobs(logp, batch.loss_mask)
        j = self.cfg.judge
        judge = GenerativeJudge(self.judge_engine,
                                lambda text, n: self.encode(text, n, instruction="", limit_key="judge.max_prompt_len"),
                                samples=j.samples, temperature=j.temperature, top_p=j.top_p,
                                max_tokens=j.max_tokens, seed=self.cfg.trainer.seed + 20_000)
        prompts = [JudgePrompt(uid=r.uid, question=r.question, images=self.images_of(r)) for r in records]
        scores, _ = judge.score(prompts, trajectories, step=self.state["step"])
        return scores

    def rewards(self, records, trajectories, judge_scores):
        """Rewards per reward.mode (random: the control run's Bernoulli(1/2) rewards)."""
        from megatron_selfjudge.rewards.combine import compute_rewards

        rw = self.cfg.reward
        by_uid = {r.uid: r for r in records}
        texts = [t.text for t in trajectories]
        gids = [t.uid for t in trajectories]
        labels = [by_uid[t.uid].answer for t in trajectories]
        if rw.mode == "ground_truth" and any(lab is None for lab in labels):
            raise ValueError("reward.mode=ground_truth needs an answer for every training prompt")
        res = compute_rewards(texts, gids, rw.mode, judge_scores=judge_scores,
                              ground_truths=labels if all(lab is not None for lab in labels) else None,
                              equivalence=rw.equivalence, consistency_gate=rw.consistency_gate,
                              format_penalty=rw.format_penalty, calibration=rw.calibration,
                              unparsed_policy=self.cfg.judge.unparsed, timeout=rw.symbolic_timeout,
                              seed=self.cfg.trainer.seed * 1_000_003 + self.state["step"])
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
        from megatron_selfjudge.megatron.train_step import train_on_rollout
        from megatron_selfjudge.rollout.base import SamplingConfig

        cfg, t, r = self.cfg, self.cfg.trainer, self.cfg.rollout
        t0 = time.perf_counter()
        drawn = [self.task.train[i] for i in self.sampler.next(t.prompts_per_step)]
        mine = prompt_shard(len(drawn), t.mini_batch_prompts, parallel_state.get_data_parallel_rank(), _dp_size())
        records = [drawn[i] for i in mine]
        requests = self.requests(records)
        self.weight_sync.ensure_current(self.state["policy_version"])
        # One seed per step; each sample's stream is keyed by it, its prompt's uid and its index.
        trajs = self.engine.generate(requests, SamplingConfig(
            n=r.n, temperature=r.temperature, top_p=r.top_p, max_new_tokens=r.max_response_len,
            seed=t.seed * 7919 + self.state["step"]))
        t_roll = time.perf_counter()
        req_by_uid = {q.uid: q for q in requests}
        # Advantages are filled in once the rewards are known (the likelihood Judge needs the batch).
        batch = self.policy_batch([x.prompt_ids for x in trajs], [x.response_ids for x in trajs],
                                  [req_by_uid[x.uid].images for x in trajs], torch.zeros(len(trajs)))
        mb = t.micro_batch_tokens
        old = compute_logprobs(self.ddp, batch, temperature=r.temperature, max_tokens=mb, shard_data_parallel=False)
        # At temperature 1 the reference log-probs are also the likelihood Judge's: compute once.
        judge_reuses_ref = (cfg.reward.mode in ("judge", "judge_raw") and cfg.judge.kind == "likelihood"
                            and r.temperature == 1.0)
        with self.initial.use():  # on GPU the frozen copy is in host memory except here
            ref = self.initial.logprobs(batch, temperature=r.temperature, max_tokens=mb, shard_data_parallel=False) \
                if cfg.loss.beta_kl > 0 or judge_reuses_ref else None
            scores = self.judge_scores(records, trajs, batch, ref)
        rewards, res = self.rewards(records, trajs, scores)
        gids = [x.uid for x in trajs]
        a = cfg.advantage
        adv = compute_advantages(rewards, gids, a.estimator, temperature=a.temperature, center=a.center, eps=a.eps)
        batch.advantages = adv
        batch = batch.with_logprobs(old, ref if cfg.loss.beta_kl > 0 else None)
        t_prep = time.perf_counter()
        history = train_on_rollout(self.ddp, self.optimizer, batch, self.loss_settings(), group_ids=gids,
                                   prompts_per_mini_batch=t.mini_batch_prompts, max_tokens=mb, local=True)
        t_upd = time.perf_counter()
        self.state["policy_version"] += len(history)
        synced = self.weight_sync.push(self.state["policy_version"])
        lengths = torch.tensor([len(x.response_ids) for x in trajs], dtype=torch.float32)
        out = _mean_over_data_parallel({
            **res.metrics(), "reward_mean": float(rewards.mean()), "adv_mean": float(adv.mean()),
            "response_len_mean": float(lengths.mean()),
            "stop_frac": sum(x.finish_reason == "stop" for x in trajs) / len(trajs),
            "adv_sq_mean": float((adv.double() ** 2).mean()),
            "rollouts_per_rank": float(len(trajs)),  # equal on every rank: P * G / dp
        }, sums=("judge_unparsed",))
        # The standard deviation of all ranks' advantages (unbiased, as torch.std of the whole batch).
        n_all = len(trajs) * _dp_size()
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

    # ---- checkpoints ----
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
        from megatron_selfjudge.megatron.checkpoint import checkpoint_candidates, has_step_checkpoints, \
            load_checkpoint
        from megatron_selfjudge.runtime.run_state import load_newest_intact

        if self.cfg.trainer.resume != "auto":
            return False
        found = load_newest_intact(checkpoint_candidates(self.ckpt_root),
                                   lambda path: load_checkpoint(path, self.ddp, self.optimizer),
                                   self.log.info, has_step_checkpoints(self.ckpt_root), self.ckpt_root)
        if found is None:
            return False
        path, self.state = found
        self.state.setdefault("policy_version", 0)
        self.sampler = PromptSampler(len(self.task.train), self.cfg.trainer.seed, **self.state["sampler"])
        self.log.info(f"resumed from {path} (step {self.state['step']}, phase {self.state['phase']})")
        return True

    def check_config(self) -> None:
        """When resuming, refuse meaning-changing differences from the saved config.yaml (rank 0 reads it)."""
        from megatron_selfjudge.runtime.ranks import raise_if_any_rank_failed
        from megatron_selfjudge.runtime.run_state import RunStateError, check_config_drift

        error = None
        if self.main:
            saved = self.run_dir / "config.yaml"
            try:
                if self.cfg.trainer.resume == "auto":
                    changed = check_config_drift(saved, self.cfg, self.cfg.trainer.allow_config_change)
                    if changed:
                        self.log.info(f"resuming with changed settings: {', '.join(changed)}")
            except RunStateError as exc:  # raised below, once every rank knows
                error = exc
        raise_if_any_rank_failed(error, "the run-directory config check")

    def write_config(self) -> None:
        """config.yaml (resolved); written only once the run is known to start or resume."""
        if self.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))

    def make_initial_copy(self, from_disk: bool) -> None:
        """Reference + Judge: one frozen copy of the policy as it enters stage 2.

        A run resumed inside stage 2 rebuilds it from checkpoints/initial (and refuses to go on
        when that copy is missing or damaged); otherwise the current policy is copied and saved
        there (replacing any older run's copy).
        """
        from megatron_selfjudge.megatron.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
        from megatron_selfjudge.megatron.frozen import frozen_copy

        from megatron_selfjudge.megatron.checkpoint import CheckpointDamaged
        from megatron_selfjudge.runtime.run_state import RunStateError, require_initial_copy

        init_root = self.ckpt_root / "initial"
        # The builders re-seed the global RNG; keep the run's stream where it was.
        with torch.random.fork_rng(devices=[]):
            if not from_disk:
                save_checkpoint(init_root, 0, self.ddp, None, {"what": "initial policy: reference and Judge"},
                                keep_last=1)
                self.initial = frozen_copy(self.policy, self.build, self.offload_frozen)
            else:  # resumed mid-run: the policy has moved on, so the copy can only come from disk
                path = require_initial_copy(init_root, self.state["step"], latest_checkpoint(init_root))
                module = self.build()
                try:
                    load_checkpoint(path, module, None, load_rng=False)
                except CheckpointDamaged as exc:
                    raise RunStateError(f"the frozen initial copy (reference and Judge) is damaged: {exc}") \
                        from None
                self.initial = frozen_copy(module, self.build, self.offload_frozen)
        if uses_generative_judge(self.cfg):
            from megatron_selfjudge.rollout.base import build_engine

            # The Judge's engine is loaded once from the frozen initial weights and never synced.
            self.judge_engine = build_engine(self.cfg.judge.backend or self.cfg.rollout.backend,
                                             model=self.initial.module, tokenizer=self.tokenizer,
                                             max_batch_size=self.cfg.rollout.max_batch_size)

    # ---- the run ----
    def total_steps(self) -> int:
        """trainer.max_steps, or trainer.epochs passes over the unlabeled prompts."""
        t = self.cfg.trainer
        if t.max_steps >= 0:
            return t.max_steps
        return t.epochs * (len(self.task.train) // t.prompts_per_step)

    def run(self) -> int:
        """SFT -> eval before -> UPT steps (checkpointed, preemptible) -> eval after -> table.

        A stop signal (SIGTERM/SIGUSR1) is honoured within one SFT step, one UPT step or one
        generation batch of the final evaluation: the run saves a checkpoint and returns 0. An
        interrupted evaluation is not recorded, so the resumed run repeats it. During the first
        evaluation ("before") the stop waits for the first UPT step (see stopped_in_eval).
        """
        from megatron_selfjudge.eval.heldout import EvalInterrupted
        from megatron_selfjudge.preemption import PreemptionHandler

        t = self.cfg.trainer
        self.check_config()
        # Inside stage 2 the frozen copy comes from disk: load it before anything is written, so a
        # missing or damaged copy is refused with the run directory untouched.
        in_stage2 = self.resume() and self.state["step"] > 0
        if in_stage2:
            self.make_initial_copy(from_disk=True)
        self.write_config()
        if self.task.skipped:
            self.log.info(f"data: skipped {self.task.skipped} unusable rows (data.on_error=skip)")
        with PreemptionHandler() as preempt:
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

            if self.state["phase"] == "sft" and self.run_sft(preempt):
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


def _dp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_world_size()


def _mean_over_data_parallel(values: dict[str, float], sums: Sequence[str] = ()) -> dict[str, float]:
    """Each value averaged over the data-parallel ranks (summed for the keys in `sums`).

    Every rank holds the same number of rows, so the mean of the ranks' means is the batch mean.
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_selfjudge.megatron.forward import comm_device

    dp = _dp_size()
    if dp == 1:
        return dict(values)
    keys = sorted(values)
    packed = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=comm_device())
    dist.all_reduce(packed, group=parallel_state.get_data_parallel_group())
    return {k: v if k in sums else v / dp for k, v in zip(keys, packed.tolist())}


class _Printer:
    """Rank-0 console output: rich progress bars and info lines."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        if enabled:
            from rich.console import Console

            self.console = Console(stderr=True)

    def info(self, msg: str) -> None:
        """One log line."""
        if self.enabled:
            # soft_wrap: one log line stays one line in Slurm logs, whatever the terminal width.
            self.console.print(f"[selfjudge] {msg}", highlight=False, markup=False, soft_wrap=True)

    def progress(self, title: str, total: int, done: int):
        """Context manager yielding advance(description) for a rich progress bar."""
        from contextlib import contextmanager

        @contextmanager
        def bar():
            if not self.enabled:
                yield lambda desc="": None
                return
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
                TimeRemainingColumn

            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                          console=self.console, transient=False) as prog:
                task = prog.add_task(title, total=total, completed=done, info="")
                yield lambda desc="": prog.update(task, advance=1, info=desc)
        return bar()


def main(cfg: Config) -> int:
    """Run training as configured; returns a process exit code."""
    import torch.distributed as dist

    from megatron_selfjudge.megatron.parallel import destroy_parallel
    from megatron_selfjudge.runtime import preflight
    from megatron_selfjudge.runtime.children import guard_children
    from megatron_selfjudge.runtime.lock import hold_run_dir

    # Config against the platform, before any collective: every rank refuses alike, in seconds
    # (before guard_children, which imports megatron-core's checkpoint machinery).
    checked = preflight.check_launch(cfg)
    guard_children()  # checkpoint writers and other helpers die with this process
    created = setup_distributed(cfg)
    seed_everything(cfg.trainer.seed)
    try:
        preflight.check_ranks(cfg, checked)  # data, run directory, memory: one rank's failure stops all
        log = _Printer(is_main_rank())
        for line in checked.summary():
            log.info(line)
        # Locked before anything is written there (the Trainer opens TensorBoard, run() config.yaml).
        with hold_run_dir(cfg.trainer.run_dir, is_main_rank()):
            return Trainer(cfg).run()
    finally:
        destroy_parallel()
        if created and dist.is_initialized():
            dist.destroy_process_group()
            for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                os.environ.pop(key, None)
