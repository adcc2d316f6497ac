"""Question synthesis with the current policy: generate, filter, vote, and hand rows to a writer.

For each chunk of source rows (so that only one chunk's preprocessed images are held):
    synthesis prompts (prompts.py, one per source row; too long for rollout.max_prompt_len:
    the row is skipped and counted) -> `per_source` replies each through the rollout engine ->
    parse + well-formed -> not a near-duplicate of the source question, nor of a question kept
    before it in its scope (the same image, or the whole set) -> n sampled answers to each
    surviving question, in the run's answer format -> majority vote -> kept when the majority
    holds at least `agreement` of the n samples; its answer is the row's pseudo-answer.
A candidate dropped as unanswerable has already been entered in the duplicate index, so a later
near-copy of it is counted as a duplicate (the copy would be as unanswerable).

Every candidate lands in exactly one bucket: malformed (by reason), duplicate_source,
duplicate_other, unanswerable or kept (`SynthCounts.check`).
"""
from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Hashable, Optional, Protocol, Sequence

from megatron_selfjudge.rollout.base import RolloutEngine, RolloutRequest, SamplingConfig
from megatron_selfjudge.synth import filters
from megatron_selfjudge.synth.prompts import STRATEGIES, SynthPrompt, parse_reply

DEDUP_SCOPES = ("image", "all")
EXAMPLES_PER_BUCKET = 3  # dropped replies quoted in the summary, per reason


@dataclass(frozen=True)
class SynthSettings:
    """What to generate and how strictly to filter it (the run-derived values have no default)."""

    strategy: str  # in-context | direct
    samples: int  # n: sampled answers per new question for the majority vote
    temperature: float
    top_p: float
    max_answer_tokens: int  # new tokens per sampled answer (the run's rollout.max_response_len)
    seed: int
    equivalence: str  # answer classes (reward.equivalence)
    timeout: float  # reward.symbolic_timeout
    batch_size: int  # sequences per generate call (rollout.max_batch_size)
    agreement: float = 0.5  # required share of the n samples that vote for the majority answer
    per_source: int = 1  # new questions sampled per source row
    max_similarity: float = 0.85  # n-gram Jaccard at or above which two questions are duplicates
    dedup_scope: str = "image"  # duplicates among new questions: about the same image | anywhere
    min_chars: int = 8
    max_chars: int = 1000
    max_question_tokens: int = 256  # new tokens per synthesis reply

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: unknown {self.strategy!r}; choose one of {STRATEGIES}")
        if self.dedup_scope not in DEDUP_SCOPES:
            raise ValueError(f"dedup scope: unknown {self.dedup_scope!r}; choose one of {DEDUP_SCOPES}")
        if not 0.0 <= self.agreement <= 1.0:
            raise ValueError(f"agreement must be in [0, 1], got {self.agreement!r}")
        if not 0.0 < self.max_similarity <= 1.0:
            raise ValueError(f"max similarity must be in (0, 1], got {self.max_similarity!r}")
        for name in ("samples", "per_source", "min_chars", "max_chars", "max_question_tokens",
                     "max_answer_tokens", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name.replace('_', ' ')} must be an int >= 1, got {value!r}")
        if self.min_chars > self.max_chars:
            raise ValueError(f"min chars ({self.min_chars}) exceeds max chars ({self.max_chars})")


class Family(Protocol):
    """The part of a model family synthesis uses (megatron/models/family.py)."""

    def prompt_ids(self, question: str, num_images: int, instruction: str) -> list[int]: ...
    def images(self, images: Sequence[Any]) -> Any: ...
    def num_images(self, images: Sequence[Any]) -> int: ...


@dataclass
class SynthRow:
    """One kept question: its source row's images, the question, the majority answer and provenance."""

    images: Sequence[Any]  # PIL images
    question: str
    answer: str
    agreement: float
    source_uid: str
    strategy: str


@dataclass
class SynthCounts:
    """How many candidates each filter dropped; every candidate is in exactly one bucket."""

    sources: int = 0  # source rows read
    prompt_too_long: int = 0  # source rows whose synthesis prompt exceeds rollout.max_prompt_len
    generated: int = 0  # candidate replies
    malformed: Counter = field(default_factory=Counter)  # reason -> candidates
    duplicate_source: int = 0
    duplicate_other: int = 0
    unanswerable: int = 0
    kept: int = 0
    examples: dict = field(default_factory=dict)  # bucket -> a few dropped replies, for the summary

    def check(self, per_source: int) -> None:
        """Raise if the buckets do not add up (a bug, never bad input)."""
        buckets = sum(self.malformed.values()) + self.duplicate_source + self.duplicate_other \
            + self.unanswerable + self.kept
        if buckets != self.generated or self.generated != (self.sources - self.prompt_too_long) * per_source:
            raise AssertionError(f"synthesis counts do not add up: {self.as_dict()}")

    def note(self, bucket: str, text: str) -> None:
        """Remember one dropped reply of `bucket` (the first few only)."""
        shown = self.examples.setdefault(bucket, [])
        if len(shown) < EXAMPLES_PER_BUCKET:
            shown.append(text[:300])

    def as_dict(self) -> dict:
        """Plain dict for JSON (malformed by reason, sorted)."""
        out = asdict(self)
        out["malformed"] = dict(sorted(self.malformed.items()))
        out["malformed_total"] = sum(self.malformed.values())
        return out


@dataclass
class _Candidate:
    record: int  # index into the chunk's records
    sample: int  # which of the source row's replies
    question: str
    prompt_ids: list[int]


def _image_key(images: Sequence[Any]) -> str:
    """Content hash of a row's decoded images: rows showing the same pixels share a dedup scope."""
    h = hashlib.sha256()
    for img in images:
        h.update(f"{img.mode}{img.size}".encode())
        h.update(img.tobytes())
    return h.hexdigest()


class Synthesizer:
    """Runs the synthesis pipeline over source records with one rollout engine and model family."""

    def __init__(self, engine: RolloutEngine, family: Family, settings: SynthSettings, prompt: SynthPrompt, *,
                 answer_instruction: str, max_prompt_len: int):
        self.engine, self.family, self.s, self.prompt = engine, family, settings, prompt
        self.answer_instruction = answer_instruction
        self.max_prompt_len = max_prompt_len
        self.counts = SynthCounts()
        self.index = filters.DuplicateIndex(settings.max_similarity)

    def _encode(self, text: str, n_images: int, instruction: str) -> Optional[list[int]]:
        ids = self.family.prompt_ids(text, n_images, instruction)
        return ids if len(ids) <= self.max_prompt_len else None

    def _generate(self, requests: list[RolloutRequest], n: int, max_new: int, seed: int) -> list:
        """All samples of `requests`, in calls of at most batch_size sequences (a request's n together)."""
        per_call = max(1, self.s.batch_size // n)
        sampling = SamplingConfig(n=n, temperature=self.s.temperature, top_p=self.s.top_p,
                                  max_new_tokens=max_new, seed=seed)
        out: list = []
        for start in range(0, len(requests), per_call):
            out += self.engine.generate(requests[start:start + per_call], sampling)
        return out

    def _drop(self, bucket: str, text: str) -> None:
        if bucket.startswith("malformed."):
            self.counts.malformed[bucket.split(".", 1)[1]] += 1
        else:
            setattr(self.counts, bucket, getattr(self.counts, bucket) + 1)
        self.counts.note(bucket, text)

    def chunk_size(self) -> int:
        """Source rows per chunk: one synthesis call's worth."""
        return max(1, self.s.batch_size // self.s.per_source)

    def run_chunk(self, records: Sequence[Any], first_index: int) -> list[SynthRow]:
        """Synthesise, filter and vote for one chunk of records; `first_index` numbers them globally."""
        s = self.s
        self.counts.sources += len(records)
        images = [self.family.images(r.images) for r in records]
        n_images = [self.family.num_images(r.images) for r in records]
        requests = []
        for i, rec in enumerate(records):
            ids = self._encode(self.prompt.render(s.strategy, rec.question), n_images[i], "")
            if ids is None:
                self.counts.prompt_too_long += 1
                continue
            requests.append(RolloutRequest(uid=f"src{first_index + i}", prompt_ids=ids, images=images[i],
                                           metadata={"record": i}))
        if not requests:
            return []
        replies = self._generate(requests, s.per_source, s.max_question_tokens, s.seed)
        self.counts.generated += len(replies)
        by_uid = {q.uid: q.metadata["record"] for q in requests}
        keys: dict[int, Hashable] = {}
        candidates: list[_Candidate] = []
        for reply in replies:
            i = by_uid[reply.uid]
            raw, reason = parse_reply(reply.text, reply.finish_reason, self.prompt.tagged)
            question = filters.clean_question(raw) if raw is not None else ""
            reason = reason or filters.check_question(question, min_chars=s.min_chars, max_chars=s.max_chars)
            ids = None if reason else self._encode(question, n_images[i], self.answer_instruction)
            if reason is None and ids is None:
                reason = "prompt_too_long"
            if reason:
                self._drop(f"malformed.{reason}", reply.text)
                continue
            if filters.similarity(question, records[i].question) >= s.max_similarity:
                self._drop("duplicate_source", question)
                continue
            if i not in keys:
                keys[i] = _image_key(records[i].images) if s.dedup_scope == "image" else None
            if self.index.duplicate(question, keys[i]):
                self._drop("duplicate_other", question)
                continue
            self.index.add(question, keys[i])
            candidates.append(_Candidate(record=i, sample=reply.sample_index, question=question, prompt_ids=ids))
        if not candidates:
            return []
        # Keyed by source row and reply, so each question's answer samples do not depend on the chunking.
        asks = [RolloutRequest(uid=f"q{first_index + c.record}.{c.sample}", prompt_ids=c.prompt_ids,
                               images=images[c.record]) for c in candidates]
        answers = self._generate(asks, s.samples, s.max_answer_tokens, s.seed + 1)
        rows = []
        for k, cand in enumerate(candidates):
            texts = [t.text for t in answers[k * s.samples:(k + 1) * s.samples]]
            vote = filters.agreement(texts, s.equivalence, s.timeout)
            if not filters.answerable(vote, s.agreement):
                self._drop("unanswerable", f"{cand.question}  [majority {vote.answer!r}, agreement "
                                           f"{vote.agreement:.2f}]")
                continue
            rec = records[cand.record]
            self.counts.kept += 1
            rows.append(SynthRow(images=list(rec.images), question=cand.question, answer=vote.answer,
                                 agreement=vote.agreement, source_uid=rec.uid, strategy=s.strategy))
        return rows

    def run(self, records: Sequence[Any], write: Callable[[SynthRow], None],
            advance: Callable[[str], None] = lambda desc: None) -> SynthCounts:
        """The whole pipeline over `records`; each kept row goes to `write` as soon as it is known."""
        size = self.chunk_size()
        for start in range(0, len(records), size):
            for row in self.run_chunk(records[start:start + size], start):
                write(row)
            advance(f"kept {self.counts.kept} of {self.counts.generated}")
        self.counts.check(self.s.per_source)
        return self.counts
