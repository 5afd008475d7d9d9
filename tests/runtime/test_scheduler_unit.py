"""The scheduler, the engine's step and the slot runner over a fake backend (numpy, no onnx): admission,
slot reuse, chunk boundaries that do not depend on the load, cancel, and every finish reason; and the
stall-free time budget on a fake clock: every step decodes every running stream, the prefill riding along
stays within its budget, and neither the budget nor the measured costs move a chunk boundary or a token.

The fake's next token depends on everything in its slot (sum and count of the ids written there), so a
chunk written to the wrong slot, twice, or out of order changes the answer.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit

from llava_edge.runtime.engine import Engine, PromptTooLongError
from llava_edge.runtime.finish import FinishReason
from llava_edge.runtime.model_runner import SingleRunner, SlotRunner, make_runner
from llava_edge.runtime.scheduler import Scheduler, StepCosts
from llava_edge.runtime.sequence import GenerationParams, Status

V = 64
CONTEXT = 128


def rule(history: list[int]) -> int:
    """The fake model: the next token of a slot holding ``history``."""
    return (sum(history) * 7 + len(history)) % V


def reference(prompt: list[int], n: int) -> list[int]:
    hist, out = list(prompt), []
    for _ in range(n):
        out.append(rule(hist))
        hist.append(out[-1])
    return out


def one_hot(tokens: list[int]) -> np.ndarray:
    logits = np.zeros((len(tokens), V), np.float32)
    logits[np.arange(len(tokens)), tokens] = 10.0
    return logits


class FakeSlotBackend:
    """The slot-addressed backend protocol (runtime.backend.SlotBackend) over python lists."""

    name = "fake-slots"
    float_dtype = np.dtype(np.float32)
    supports_prefix_reuse = False

    def __init__(self):
        self.calls: list[tuple[str, int, tuple[int, ...]]] = []  # (kind, slot, ids written)

    def encode_images(self, pixel_values):
        raise AssertionError("no images in these tests")

    def embed(self, input_ids):
        return np.asarray(input_ids, np.float32)[..., None]

    def new_slot_cache(self, slots, max_len=None):
        return SimpleNamespace(max_len=max_len or CONTEXT, lengths=np.zeros(slots, np.int32),
                               hist=[[] for _ in range(slots)])

    def prefill_slot(self, kv, slot, embeds):
        ids = [int(x) for x in embeds[0, :, 0]]
        kv.hist[slot] = kv.hist[slot][: kv.lengths[slot]] + ids
        kv.lengths[slot] = len(kv.hist[slot])
        self.calls.append(("prefill", slot, tuple(ids)))
        return one_hot([rule(kv.hist[slot])])[0]

    def decode_slots(self, kv, embeds, active):
        out = []
        for row in range(embeds.shape[0]):
            if active[row]:
                kv.hist[row] = kv.hist[row][: kv.lengths[row]] + [int(embeds[row, 0, 0])]
                kv.lengths[row] += 1
            out.append(rule(kv.hist[row]))
        self.calls.append(("decode", -1, tuple(np.flatnonzero(active))))
        return one_hot(out)

    def snapshot_slot(self, kv, slot):
        return list(kv.hist[slot][: kv.lengths[slot]])

    def resume_slot(self, kv, slot, state, prefix_len):
        kv.hist[slot], kv.lengths[slot] = list(state[:prefix_len]), prefix_len


class FakePlainBackend:
    """The plain Backend protocol (portable onnxruntime, TensorRT): one cache per request, no slots."""

    name = "fake-plain"
    float_dtype = np.dtype(np.float32)
    supports_prefix_reuse = False

    def encode_images(self, pixel_values):
        raise AssertionError("no images in these tests")

    def embed(self, input_ids):
        return np.asarray(input_ids, np.float32)[..., None]

    def new_cache(self, batch, max_len):
        return SimpleNamespace(hist=[[] for _ in range(batch)], max_len=max_len)

    def step(self, cache, inputs_embeds, attention_mask, position_ids):
        out = []
        for b, row in enumerate(inputs_embeds):
            cache.hist[b] += [int(x) for x in row[:, 0]]
            assert len(cache.hist[b]) <= cache.max_len
            out.append(rule(cache.hist[b]))
        return one_hot(out)


def _tokenizer() -> Tokenizer:
    tok = Tokenizer(WordLevel({f"t{i}": i for i in range(V)}, unk_token="t0"))
    tok.pre_tokenizer = WhitespaceSplit()
    return tok


def _engine(slots=2, chunk=4, eos=(), backend=None, prefill_budget=None) -> Engine:
    """prefill_budget None (not the engine's default): one chunk per step, whatever the clock says."""
    manifest = SimpleNamespace(text=SimpleNamespace(max_context=CONTEXT, eos_token_ids=list(eos), image_token_id=-1),
                               vision=None)
    return Engine(make_runner(backend or FakeSlotBackend(), slots, chunk), manifest, _tokenizer(), image_cache_mb=0,
                  prefill_budget=prefill_budget)


def _prompt(i: int, n: int) -> list[int]:
    """A prompt of n ids from a range of its own (so a chunk tells whose it is by its first id)."""
    return [(10 * i + k) % 8 + 8 * i + 1 for k in range(n)]


def _run(engine, seqs, max_steps=500, add=True):
    events = []
    for s in seqs if add else ():
        engine.add(s)
    for _ in range(max_steps):
        if all(s.status is Status.FINISHED for s in seqs):
            return events
        events += engine.step()
    raise AssertionError("did not finish")


def test_runner_kind_follows_the_slot_protocol():
    assert isinstance(make_runner(FakeSlotBackend(), 2), SlotRunner)
    assert isinstance(make_runner(FakePlainBackend(), 2), SingleRunner)


def test_tokens_match_the_reference_alone_and_in_a_crowd():
    prompts = [_prompt(i, n) for i, n in enumerate((3, 9, 14, 5, 11))]
    alone = []
    for p in prompts:
        e = _engine(slots=1)
        (s,) = [e.make_sequence(p, params=GenerationParams(6))]
        _run(e, [s])
        alone.append(s.generated)
        assert s.generated == reference(p, 6) and s.finish_reason is FinishReason.LENGTH
    e = _engine(slots=3)
    seqs = [e.make_sequence(p, params=GenerationParams(6)) for p in prompts]
    _run(e, seqs)
    assert [s.generated for s in seqs] == alone


def test_plain_backend_runs_one_sequence_at_a_time_with_the_same_tokens():
    prompts = [_prompt(i, n) for i, n in enumerate((3, 9, 14))]
    e = _engine(slots=4, backend=FakePlainBackend())
    assert e.runner.slots == 1
    seqs = [e.make_sequence(p, params=GenerationParams(5)) for p in prompts]
    _run(e, seqs)
    assert [s.generated for s in seqs] == [reference(p, 5) for p in prompts]


def test_admission_waits_for_a_free_slot_and_reuses_a_finished_ones():
    e = _engine(slots=2, chunk=None)
    a, b, c = (e.make_sequence(_prompt(i, 4), params=GenerationParams(n)) for i, n in enumerate((3, 8, 3)))
    for s in (a, b, c):
        e.add(s)
    e.step()  # prefill gives each its first token, the decode call in the same step its second
    assert (a.slot, b.slot, c.slot) == (0, 1, None) and c.status is Status.WAITING
    assert e.scheduler.free_slots == 0 and e.queued == 1
    e.step()  # a's third token: a finishes and leaves at once
    assert a.status is Status.FINISHED and a.slot is None and e.scheduler.free_slots == 1
    e.step()
    assert c.slot == 0 and c.status is not Status.WAITING and e.queued == 0  # the lowest free slot
    _run(e, [b, c], add=False)
    assert c.generated == reference(_prompt(2, 4), 3) and e.scheduler.free_slots == 2 and e.scheduler.idle()


def test_chunk_boundaries_do_not_depend_on_the_load():
    chunk = 4

    def chunks(backend, seq_prompt):
        first = set(seq_prompt)
        return [len(ids) for kind, _, ids in backend.calls if kind == "prefill" and ids[0] in first]

    p = _prompt(1, 11)
    alone = FakeSlotBackend()
    e = _engine(slots=1, chunk=chunk, backend=alone)
    _run(e, [e.make_sequence(p, params=GenerationParams(3))])
    assert chunks(alone, p) == [4, 4, 3]
    crowd = FakeSlotBackend()
    e = _engine(slots=3, chunk=chunk, backend=crowd)
    others = [e.make_sequence(_prompt(i, n), params=GenerationParams(4)) for i, n in ((2, 6), (3, 13))]
    target = e.make_sequence(p, params=GenerationParams(3))
    e.add(others[0])
    e.step()  # the other is mid-prefill when the target arrives
    _run(e, [others[1], target])
    assert chunks(crowd, p) == [4, 4, 3]
    assert target.generated == reference(p, 3)


def test_without_a_time_budget_a_step_holds_at_most_one_chunk_of_prefill():
    backend = FakeSlotBackend()
    e = _engine(slots=3, chunk=4, backend=backend)
    seqs = [e.make_sequence(_prompt(i, 10), params=GenerationParams(2)) for i in range(3)]
    for s in seqs:
        e.add(s)
    while not all(s.status is Status.FINISHED for s in seqs):
        before = len(backend.calls)
        e.step()
        prefilled = sum(len(ids) for kind, _, ids in backend.calls[before:] if kind == "prefill")
        assert prefilled <= 4


def test_scheduler_budget_lets_at_least_one_chunk_through():
    sched = Scheduler(2, chunk=8, token_budget=4)
    e = _engine(slots=2)
    s = e.make_sequence(_prompt(0, 20), params=GenerationParams(1))
    sched.add(s)
    sched.admit()
    s.embeds = np.zeros((20, 1), np.float32)
    plan = sched.prefill_plan()
    assert [(c.start, c.end) for c in plan] == [(0, 8)]


def test_cancel_frees_the_slot_for_the_next_request():
    e = _engine(slots=1, chunk=None)
    a = e.make_sequence(_prompt(0, 4), params=GenerationParams(50))
    b = e.make_sequence(_prompt(1, 4), params=GenerationParams(3))
    e.add(a)
    e.add(b)
    e.step()
    e.step()
    assert a.slot == 0 and b.status is Status.WAITING
    e.cancel(a.seq_id)
    events = e.step()
    assert a.finish_reason is FinishReason.CANCELLED and a.slot is None
    assert any(ev.seq_id == a.seq_id and ev.finish_reason == "cancelled" and ev.token_id is None for ev in events)
    assert b.slot == 0
    _run(e, [b], add=False)
    assert b.generated == reference(_prompt(1, 4), 3)
    e.cancel(b.seq_id)  # cancelling a finished sequence changes nothing
    assert e.step() == [] and b.finish_reason is FinishReason.LENGTH


def test_cancel_while_waiting_leaves_the_queue():
    e = _engine(slots=1, chunk=None)
    a, b = (e.make_sequence(_prompt(i, 4), params=GenerationParams(5)) for i in range(2))
    e.add(a)
    e.add(b)
    e.step()
    assert e.queued == 1
    e.cancel(b.seq_id)
    e.step()
    assert b.finish_reason is FinishReason.CANCELLED and e.queued == 0 and b not in e.scheduler.waiting


def test_finish_reasons_eos_length_stop():
    p = _prompt(0, 5)
    ref = reference(p, 12)
    eos = ref[3]
    first = ref.index(eos)
    e = _engine(slots=2, eos=[eos])
    s_eos = e.make_sequence(p, params=GenerationParams(12))
    s_ign = e.make_sequence(p, params=GenerationParams(12, ignore_eos=True))
    stop_word = f"t{ref[2]}"
    s_stop = e.make_sequence(p, params=GenerationParams(12, stop=(stop_word,), ignore_eos=True))
    events = _run(e, [s_eos, s_ign, s_stop])
    assert s_eos.finish_reason is FinishReason.EOS and s_eos.generated == ref[: first + 1]  # eos kept in the ids
    assert s_ign.finish_reason is FinishReason.LENGTH and s_ign.generated == ref
    assert s_stop.finish_reason is FinishReason.STOP and len(s_stop.generated) == ref.index(ref[2]) + 1
    streamed = "".join(ev.text for ev in events if ev.seq_id == s_stop.seq_id)
    assert stop_word not in streamed and streamed == s_stop.visible_text()
    r = s_eos.result()
    assert r.as_dict()["finish_reason"] == "eos" and isinstance(r.as_dict()["finish_reason"], str)


def test_params_are_frozen_and_checked():
    params = GenerationParams(4, stop=["x"])
    assert params.stop == ("x",)
    with pytest.raises(AttributeError):
        params.max_tokens = 5  # type: ignore[misc]
    with pytest.raises(ValueError):
        GenerationParams(0)
    e = _engine()
    with pytest.raises(PromptTooLongError, match="exceeds the model's context of 128"):
        e.make_sequence(list(range(100)), params=GenerationParams(29))
    e.make_sequence(list(range(100)), params=GenerationParams(28))


def test_a_failing_backend_fails_only_its_sequences():
    backend = FakeSlotBackend()
    e = _engine(slots=2, chunk=None, backend=backend)
    bad = e.make_sequence(_prompt(0, 4), params=GenerationParams(3))
    good = e.make_sequence(_prompt(1, 4), params=GenerationParams(3))
    real = backend.prefill_slot

    def flaky(kv, slot, embeds):
        if slot == bad.slot:
            raise RuntimeError("boom")
        return real(kv, slot, embeds)

    backend.prefill_slot = flaky
    events = _run(e, [bad, good])
    assert bad.finish_reason is FinishReason.ERROR and "boom" in bad.error
    assert any(ev.seq_id == bad.seq_id and ev.finish_reason == "error" for ev in events)
    assert good.generated == reference(_prompt(1, 4), 3)


# -- stall-free scheduling: a fake clock, the time budget, decode every step ----------------------------
TCHUNK = 4


class TimedBackend(FakeSlotBackend):
    """The fake backend on a fake clock: a prefill call costs ``per_token`` ms a token (+ ``jitter`` times a
    random fraction), a decode call ``decode`` ms; ``steps`` records each step's calls."""

    def __init__(self, per_token=1.0, decode=10.0, jitter=0.0, seed=0):
        super().__init__()
        self.now = 0.0
        self.per_token, self.decode, self.jitter = per_token, decode, jitter
        self.rng = np.random.default_rng(seed)

    def clock(self) -> float:
        return self.now / 1000

    def _spend(self, ms):
        self.now += ms * (1 + self.jitter * self.rng.random())

    def prefill_slot(self, kv, slot, embeds):
        self._spend(self.per_token * embeds.shape[1])
        return super().prefill_slot(kv, slot, embeds)

    def decode_slots(self, kv, embeds, active):
        self._spend(self.decode)
        return super().decode_slots(kv, embeds, active)


def _timed_engine(slots, budget, backend):
    e = _engine(slots=slots, chunk=TCHUNK, backend=backend, prefill_budget=budget)
    e.clock = backend.clock
    return e


def _steps(e, backend, seqs, max_steps=500):
    """Step until every sequence has finished; per step: prefill calls (seq's first id, tokens), decoded rows."""
    log = []
    for _ in range(max_steps):
        if all(s.status is Status.FINISHED for s in seqs):
            return log
        before = len(backend.calls)
        e.step()
        calls = backend.calls[before:]
        log.append(([(ids[0], len(ids)) for kind, _, ids in calls if kind == "prefill"],
                    [set(rows) for kind, _, rows in calls if kind == "decode"]))
    raise AssertionError("did not finish")


def _streams_then_newcomer(e, backend, newcomer_len=40):
    streams = [e.make_sequence(_prompt(i, 5), params=GenerationParams(40)) for i in range(3)]
    for s in streams:
        e.add(s)
    while any(s.status is not Status.RUNNING for s in streams):
        e.step()
    late = e.make_sequence(_prompt(3, newcomer_len), params=GenerationParams(3))
    e.add(late)
    return streams, late


def test_prefill_per_step_stays_within_the_time_budget_and_decode_is_never_skipped():
    backend = TimedBackend(per_token=1.0, decode=10.0)
    e = _timed_engine(4, 2.0, backend)
    streams, late = _streams_then_newcomer(e, backend)
    prefill_steps = []
    while late.status in (Status.WAITING, Status.PREFILL):
        before = len(backend.calls)
        decoded = {s.seq_id: len(s.generated) for s in streams}
        e.step()
        tokens = sum(len(ids) for kind, _, ids in backend.calls[before:] if kind == "prefill")
        assert tokens * backend.per_token <= 2.0 * backend.decode  # the step's prefill fits 2 decode calls
        assert all(len(s.generated) == decoded[s.seq_id] + 1 for s in streams)  # every stream got its token
        prefill_steps.append(tokens)
    # the budget is used, not one chunk per step: 20 ms of 4-token chunks a step once costs are known
    assert prefill_steps == [20, 20] and late.generated[:1] == reference(late.ids.tolist(), 1)


def test_a_chunk_over_the_budget_still_runs_one_per_step():
    backend = TimedBackend(per_token=10.0, decode=10.0)  # a 4-token chunk (40 ms) > 2 decode calls
    e = _timed_engine(4, 2.0, backend)
    streams, late = _streams_then_newcomer(e, backend, newcomer_len=12)
    log = _steps(e, backend, [late])
    assert [p for p, _ in log] == [[(late.ids[0], 4)], [(late.ids[4], 4)], [(late.ids[8], 4)], []]
    assert all(any({s.slot for s in streams} <= rows for rows in d) for _, d in log)


def test_with_nothing_to_decode_a_step_prefills_up_to_the_idle_budget():
    backend = TimedBackend(per_token=1.0, decode=10.0)
    e = _timed_engine(2, 2.0, backend)
    e.scheduler.idle_prefill_ms = 12.0
    seq = e.make_sequence(_prompt(0, 30), params=GenerationParams(2))
    e.add(seq)
    log = _steps(e, backend, [seq])
    # the first chunk measures the cost; then 3 chunks (12 ms) a step; the last step's tail is 2 tokens
    assert [sum(n for _, n in p) for p, _ in log if p] == [4, 12, 12, 2]
    assert seq.generated == reference(_prompt(0, 30), 2)


def test_budget_zero_is_one_chunk_per_step_while_others_decode():
    backend = TimedBackend(per_token=0.01, decode=10.0)
    e = _timed_engine(4, 0.0, backend)
    streams, late = _streams_then_newcomer(e, backend, newcomer_len=16)
    log = _steps(e, backend, [late])
    assert [n for p, _ in log for _, n in p] == [4, 4, 4, 4]


@pytest.mark.parametrize("budget", [0.0, 0.5, 2.0, 100.0, None])
def test_tokens_and_chunk_boundaries_do_not_depend_on_budget_or_timing(budget):
    """Staggered arrivals, more requests than slots, a jittery clock: each request gets the tokens it gets
    alone, through the same chunks."""
    prompts = [_prompt(i, n) for i, n in enumerate((3, 9, 14, 5, 11, 23))]
    alone = []
    for p in prompts:
        backend = TimedBackend(jitter=3.0)
        e = _timed_engine(1, budget, backend)
        s = e.make_sequence(p, params=GenerationParams(6))
        _run(e, [s])
        alone.append([ids for kind, _, ids in backend.calls if kind == "prefill"])
        assert s.generated == reference(p, 6)
    backend = TimedBackend(per_token=2.0, decode=7.0, jitter=3.0, seed=1)
    e = _timed_engine(3, budget, backend)
    seqs = [e.make_sequence(p, params=GenerationParams(6)) for p in prompts]
    for i, s in enumerate(seqs):
        e.add(s)
        e.step()  # one arrival per step
    _run(e, seqs, add=False)
    assert [s.generated for s in seqs] == [reference(p, 6) for p in prompts]
    for p, chunks in zip(prompts, alone):
        first = set(p)
        assert [ids for kind, _, ids in backend.calls if kind == "prefill" and ids[0] in first] == chunks


def test_step_costs_average_and_fall_back_to_a_smaller_batch():
    c = StepCosts(weight=0.5)
    assert c.decode_estimate(3) is None and c.prefill_ms_per_token is None
    c.observe_decode(2, 10.0)
    c.observe_decode(2, 20.0)
    assert c.decode_estimate(2) == 15.0 and c.decode_estimate(5) == 15.0 and c.decode_estimate(1) is None
    c.observe_decode(4, 30.0)
    assert c.decode_estimate(5) == 30.0 and c.decode_estimate(3) == 15.0
    c.observe_prefill(8, 16.0)
    c.observe_prefill(4, 16.0)
    assert c.prefill_ms_per_token == 3.0


def test_scheduler_refuses_a_negative_budget():
    with pytest.raises(ValueError, match="prefill_budget"):
        Scheduler(2, chunk=4, prefill_budget=-1.0)
