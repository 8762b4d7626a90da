"""The continuous batcher (diffgen.denoise.batcher) on the tiny checkpoint, without HTTP.

Order of events is made deterministic by the items themselves (a request submitted from inside
another's canvas callback is queued before the next boundary) or by holding the scheduler at its
boundaries (``conftest.hold_at_boundaries``); nothing waits on the clock.

Bitwise: on this CPU build a row's tokens batched with others are identical to the same seeded
row generated alone (and to ``loop.generate(..., execution=Execution(exact=False))``): per-row
positions and counter-based noise make that hold by construction, and the float sums happened to
agree here.
"""

from __future__ import annotations

import threading

import pytest
import torch

from conftest import hold_at_boundaries
from diffgen import prompt as prompt_mod
from diffgen.denoise import items, loop
from diffgen.denoise.batcher import Batcher
from diffgen.denoise.options import Execution

TEXTS = ["Once upon a time", "Hi", "The sky is blue because air scatters short wavelengths of sunlight", "def main():"]

FAST = Execution(exact=False)
EXACT = Execution(exact=True)


def settings(tiny, seed: int, tokens: int, **changes):
    return tiny.defaults.replace(**{"max_denoising_steps": 4, "stability_threshold": 0, "seed": seed,
                                    "max_new_tokens": tokens, **changes})


def ids(tiny, index: int) -> list[int]:
    return prompt_mod.encode(tiny.tokenizer, TEXTS[index], raw=True)


def alone(tiny, index: int, seed: int, tokens: int, **changes) -> loop.Completion:
    return loop.generate(tiny, [ids(tiny, index)], settings(tiny, seed, tokens, **changes), execution=FAST).completions[0]


KINDS = {items.Step: "step", items.Canvas: "canvas", items.Done: "done", items.Failed: "error", items.End: "end"}


def kind(item: items.Item) -> str:
    return KINDS[type(item)]


class Recorder:
    """A ticket's consumer: keeps every item; ``then`` runs on a given item (on the scheduler thread)."""

    def __init__(self, then=None):
        self.items: list[items.Item] = []
        self.then = then

    def __call__(self, item: tuple) -> None:
        self.items.append(item)
        if self.then is not None:
            self.then(item)

    def done(self) -> dict[int, loop.Completion]:
        return {item.index: item.completion for item in self.items if isinstance(item, items.Done)}

    def kinds(self) -> list[str]:
        return [kind(item) for item in self.items]


@pytest.fixture()
def make(tiny):
    made = []

    def build(**kwargs) -> Batcher:
        made.append(Batcher(tiny, **kwargs))
        return made[-1]

    yield build
    for batcher in made:
        batcher.close(wait=True)


def test_a_batch_of_one_is_stream_with_the_fast_sampler(tiny, make):
    batcher = make(max_batch=4)
    recorder = Recorder()
    batcher.submit(ids(tiny, 0), [settings(tiny, 7, 40)], recorder).wait()
    generation = loop.stream(tiny, [ids(tiny, 0)], settings(tiny, 7, 40), observe=False, execution=FAST)
    canvases = [event for event in generation if isinstance(event, loop.CanvasEvent)]
    expected = generation.result.completions[0]
    got = recorder.done()[0]
    assert got.token_ids == expected.token_ids and got.text == expected.text
    assert got.finish_reason == expected.finish_reason
    assert got.stats.steps_per_canvas == expected.stats.steps_per_canvas
    assert recorder.kinds()[-2:] == ["done", "end"]
    assert recorder.kinds().count("canvas") == len(canvases) - 1  # the last canvas comes with "done"
    counters = batcher.counters()
    assert counters.decoder_forwards == sum(event.steps for event in canvases)
    assert counters.requests_served == 1 and counters.batches == 1


def test_rows_batched_together_get_the_tokens_they_get_alone(tiny, make):
    jobs = [(0, 1, 40), (1, 2, 100), (2, 3, 16), (3, 4, 64), (0, 5, 200)]
    batcher = make(max_batch=8)
    recorders = [Recorder() for _ in jobs]
    hold = threading.Event()
    hold.set()
    hold_at_boundaries(batcher, hold.is_set)  # every request is queued before the first canvas runs
    tickets = [batcher.submit(ids(tiny, i), [settings(tiny, seed, tokens)], recorder)
               for (i, seed, tokens), recorder in zip(jobs, recorders)]
    hold.clear()
    for ticket in tickets:
        ticket.wait()
    for (i, seed, tokens), recorder in zip(jobs, recorders):
        assert recorder.done()[0].token_ids == alone(tiny, i, seed, tokens).token_ids
    counters = batcher.counters()
    assert counters.batches == 1 and counters.requests_served == len(jobs)
    # One batched pass serves every row still in it: fewer passes than one row at a time.
    assert counters.decoder_forwards < counters.row_forwards


def test_a_row_joins_at_a_canvas_boundary_and_a_longer_prompt_grows_the_cache(tiny, make):
    batcher = make(max_batch=4)
    late = Recorder()
    tickets = []

    def join_after_first_canvas(item):
        if kind(item) == "canvas" and not tickets[1:]:
            # Queued before the next boundary: it joins the running batch there. Its prompt is
            # longer than the batch's cache (2 prompt tokens + one canvas), so the cache grows.
            tickets.append(batcher.submit(ids(tiny, 2), [settings(tiny, 9, 48)], late))

    first = Recorder(join_after_first_canvas)
    assert len(ids(tiny, 1)) + 16 < len(ids(tiny, 2))
    tickets.append(batcher.submit(ids(tiny, 1), [settings(tiny, 8, 96)], first))
    tickets[0].wait()
    tickets[1].wait()
    assert batcher.counters().batches == 1  # the late row joined; no second batch
    assert first.done()[0].token_ids == alone(tiny, 1, 8, 96).token_ids
    assert late.done()[0].token_ids == alone(tiny, 2, 9, 48).token_ids


def test_n_rows_of_one_request_and_rows_leaving_early(tiny, make):
    batcher = make(max_batch=3)
    recorder = Recorder()
    rows = [settings(tiny, 20 + k, tokens) for k, tokens in enumerate((16, 80, 48, 32))]
    batcher.submit(ids(tiny, 0), rows, recorder).wait()
    done = recorder.done()
    assert sorted(done) == [0, 1, 2, 3] and recorder.kinds().count("end") == 1
    for k, row in enumerate(rows):
        assert done[k].token_ids == alone(tiny, 0, row.seed, row.max_new_tokens).token_ids


def test_other_settings_wait_for_their_own_batch_first_come_first_served(tiny, make):
    batcher = make(max_batch=8)
    order: list[str] = []
    recorders = {name: Recorder(lambda item, name=name: order.append(name) if kind(item) == "done" else None)
                 for name in "ABC"}

    def queue_b_then_c(item):
        if kind(item) in ("canvas", "done") and "B" not in queued:
            queued["B"] = batcher.submit(ids(tiny, 1), [settings(tiny, 2, 16, max_denoising_steps=3)], recorders["B"])
            # C could share A's batch, but B (another batch key) came first: C must not overtake it.
            queued["C"] = batcher.submit(ids(tiny, 3), [settings(tiny, 3, 16)], recorders["C"])
        recorders["A"].items.append(item)

    queued: dict = {}
    first = batcher.submit(ids(tiny, 0), [settings(tiny, 1, 64)], queue_b_then_c)
    first.wait()
    queued["B"].wait()
    queued["C"].wait()
    assert order == ["B", "C"] and batcher.counters().batches == 3
    assert recorders["C"].done()[0].token_ids == alone(tiny, 3, 3, 16).token_ids


def test_cancelling_frees_the_row_for_the_next_request(tiny, make):
    batcher = make(max_batch=1)
    waiting_then_cancelled = Recorder()
    second = Recorder()
    tickets: dict = {}

    def cancel_after_first_canvas(item):
        if kind(item) == "canvas" and "second" not in tickets:
            tickets["second"] = batcher.submit(ids(tiny, 1), [settings(tiny, 5, 16)], second)
            tickets["gone"] = batcher.submit(ids(tiny, 2), [settings(tiny, 6, 16)], waiting_then_cancelled)
            tickets["gone"].cancel()  # still waiting: it leaves the queue at once
            tickets["first"].cancel()  # running: dropped at the next boundary

    first = Recorder(cancel_after_first_canvas)
    tickets["first"] = batcher.submit(ids(tiny, 0), [settings(tiny, 4, 256)], first)
    for name in ("first", "second", "gone"):
        tickets[name].wait()
    assert "done" not in first.kinds() and first.kinds()[-1] == "end"
    assert waiting_then_cancelled.kinds() == ["end"]
    assert second.done()[0].token_ids == alone(tiny, 1, 5, 16).token_ids
    counters = batcher.counters()
    assert counters.requests_cancelled == 2 and counters.requests_served == 1
    assert counters.canvases == 2  # the cancelled 16-canvas request ran one canvas
    assert counters.rows_queued == 0 and counters.requests_queued == 0


def test_step_items_only_when_observed_one_row_each(tiny, make):
    batcher = make(max_batch=4)
    watched, unwatched = Recorder(), Recorder()
    hold = threading.Event()
    hold.set()
    hold_at_boundaries(batcher, hold.is_set)
    tickets = [batcher.submit(ids(tiny, 0), [settings(tiny, 1, 32)], watched, observe=True),
               batcher.submit(ids(tiny, 2), [settings(tiny, 2, 16)], unwatched)]
    hold.clear()
    for ticket in tickets:
        ticket.wait()
    steps = [item.event for item in watched.items if kind(item) == "step"]
    assert "step" not in unwatched.kinds()
    assert [(event.canvas, event.step) for event in steps] == [(c, s) for c in range(2) for s in range(1, 5)]
    assert all(event.draft.shape == (1, 16) and event.mean_entropy.shape == (1,) for event in steps)
    generation = loop.stream(tiny, [ids(tiny, 0)], settings(tiny, 1, 32), execution=FAST)
    reference = [event for event in generation if isinstance(event, loop.StepEvent)]
    assert all(torch.equal(mine.draft, theirs.draft) for mine, theirs in zip(steps, reference))


def test_a_failing_batch_reports_to_every_row_and_the_scheduler_goes_on(tiny, make, monkeypatch):
    batcher = make(max_batch=4)

    def broken(state, context):
        raise RuntimeError("the accelerator fell over")

    from diffgen.denoise import runner as runner_mod

    monkeypatch.setattr(runner_mod, "denoise_step", broken)
    recorders = [Recorder(), Recorder()]
    hold = threading.Event()
    hold.set()
    hold_at_boundaries(batcher, hold.is_set)
    tickets = [batcher.submit(ids(tiny, k), [settings(tiny, k, 16)], recorder) for k, recorder in enumerate(recorders)]
    hold.clear()
    for ticket in tickets:
        ticket.wait()
    for recorder in recorders:
        assert recorder.kinds() == ["error", "end"] and "fell over" in str(recorder.items[0].error)
    monkeypatch.undo()
    after = Recorder()
    batcher.submit(ids(tiny, 0), [settings(tiny, 3, 16)], after).wait()
    assert after.done()[0].token_ids == alone(tiny, 0, 3, 16).token_ids
    assert batcher.counters().requests_failed == 2


@pytest.mark.parametrize("graphs", [False, True])
def test_adaptive_stopping_rows_and_the_graph_path_match_rows_alone(sharp, graphs, eager_graphs):
    from conftest import SHARP_SETTINGS

    batcher = Batcher(sharp, max_batch=4, graphs=graphs)
    try:
        rows = [sharp.defaults.replace(max_denoising_steps=12, max_new_tokens=tokens, seed=seed, **SHARP_SETTINGS)
                for seed, tokens in ((1, 48), (2, 32), (3, 64))]
        prompts = [prompt_mod.encode(sharp.tokenizer, TEXTS[k], raw=True) for k in range(3)]
        recorders = [Recorder() for _ in rows]
        hold = threading.Event()
        hold.set()
        hold_at_boundaries(batcher, hold.is_set)
        tickets = [batcher.submit(p, [row], recorder) for p, row, recorder in zip(prompts, rows, recorders)]
        hold.clear()
        for ticket in tickets:
            ticket.wait()
        steps = set()
        for p, row, recorder in zip(prompts, rows, recorders):
            expected = loop.generate(sharp, [p], row, execution=FAST).completions[0]
            got = recorder.done()[0]
            assert got.token_ids == expected.token_ids
            assert got.stats.steps_per_canvas == expected.stats.steps_per_canvas
            steps.update(got.stats.steps_per_canvas)
        assert len(steps) > 1 and min(steps) < 12  # some canvases stopped early, not all at the same step
    finally:
        batcher.close(wait=True)


def test_cancelling_a_request_with_rows_running_and_rows_queued_ends_it(tiny, make):
    batcher = make(max_batch=1)
    at_boundary, released = threading.Event(), threading.Event()

    def hold() -> bool:
        at_boundary.set()
        return not released.is_set()

    hold_at_boundaries(batcher, hold)
    started = threading.Event()
    recorder = Recorder()
    ticket = batcher.submit(ids(tiny, 0), [settings(tiny, 1, 64), settings(tiny, 2, 64)], recorder,
                            on_start=started.set)
    at_boundary.wait()  # row 0 is in the batch, held before its first canvas; row 1 waits for its slot
    assert started.is_set()
    ticket.cancel()
    ticket.wait()  # the held scheduler still drops cancelled rows at its boundary
    released.set()
    assert recorder.kinds() == ["end"]
    counters = batcher.counters()
    assert counters.requests_cancelled == 1 and counters.requests_served == 0
    assert counters.rows_queued == 0 and counters.requests_queued == 0
    assert counters.canvases == 0  # the hold kept the first canvas from starting; the cancel dropped it


def test_a_canvas_whose_every_row_is_cancelled_stops_early(tiny, make):
    batcher = make(max_batch=4)
    tickets = {}

    def cancel_on_second_step(item):
        if kind(item) == "step" and item.event.step == 2:
            tickets["long"].cancel()

    recorder = Recorder(cancel_on_second_step)
    tickets["long"] = batcher.submit(ids(tiny, 0), [settings(tiny, 1, 16, max_denoising_steps=10_000)], recorder,
                                     observe=True)
    tickets["long"].wait()
    assert recorder.kinds() == ["step", "step", "end"]  # no steps delivered once cancelled, no "done"
    counters = batcher.counters()
    # The canvas stopped at the first check after the cancel, not after its 10 000 steps.
    assert counters.decoder_forwards == loop.FAST_CHECK_EVERY and counters.requests_cancelled == 1
    # A canvas with one row still wanted runs on.
    kept, dropped = Recorder(), Recorder()
    hold = threading.Event()
    hold.set()
    hold_at_boundaries(batcher, hold.is_set)
    started = [threading.Event(), threading.Event()]
    wanted = batcher.submit(ids(tiny, 1), [settings(tiny, 2, 16, max_denoising_steps=12)], kept,
                            on_start=started[0].set)
    dropped.then = lambda item: gone.cancel() if kind(item) == "step" else None
    gone = batcher.submit(ids(tiny, 2), [settings(tiny, 3, 16, max_denoising_steps=12)], dropped, observe=True,
                          on_start=started[1].set)
    for event in started:  # both admitted (the held scheduler admits at its boundary): one batch
        event.wait()
    hold.clear()
    wanted.wait()
    gone.wait()
    assert batcher.counters().decoder_forwards == loop.FAST_CHECK_EVERY + 12
    assert kept.done()[0].token_ids == alone(tiny, 1, 2, 16, max_denoising_steps=12).token_ids
    assert dropped.kinds() == ["step", "end"]


def test_a_request_failing_to_join_leaves_the_running_batch_alone(tiny, make, monkeypatch):
    batcher = make(max_batch=4)
    poison = ids(tiny, 2)
    from diffgen.denoise import backends

    real_encode = backends.run_encoder

    def encode(model, input_ids, *args, **kwargs):
        if any(row[-len(poison):] == poison for row in input_ids.tolist()):
            raise RuntimeError("out of memory for this prompt")
        return real_encode(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(backends, "run_encoder", encode)
    joining = Recorder()
    tickets = []

    def submit_after_first_canvas(item):
        if kind(item) == "canvas" and not tickets[1:]:
            tickets.append(batcher.submit(poison, [settings(tiny, 9, 32)], joining))

    running = Recorder(submit_after_first_canvas)
    # The newcomer's prompt is longer than the batch's cache: admitting it would grow that cache.
    assert len(ids(tiny, 1)) + 16 < len(poison)
    tickets.append(batcher.submit(ids(tiny, 1), [settings(tiny, 8, 64)], running))
    tickets[0].wait()
    tickets[1].wait()
    assert joining.kinds() == ["error", "end"] and "out of memory" in str(joining.items[0].error)
    assert "error" not in running.kinds()
    assert running.done()[0].token_ids == alone(tiny, 1, 8, 64).token_ids
    counters = batcher.counters()
    assert counters.requests_failed == 1 and counters.requests_served == 1 and counters.batches == 1


def test_a_consumer_that_raises_takes_its_queued_rows_out_of_the_queue(tiny, make):
    batcher = make(max_batch=1)

    def broken(item):
        if kind(item) == "canvas":
            raise BrokenPipeError("the client went away")

    recorder = Recorder(broken)
    ticket = batcher.submit(ids(tiny, 0), [settings(tiny, 1, 64), settings(tiny, 2, 64)], recorder)
    ticket.wait()
    assert recorder.kinds() == ["canvas", "end"]
    counters = batcher.counters()
    assert counters.canvases == 1  # row 1 never ran: it left the queue when row 0's consumer failed
    assert counters.requests_cancelled == 1 and counters.rows_queued == 0 and counters.requests_queued == 0


def test_a_cancelled_request_hit_by_a_batch_failure_counts_as_cancelled(tiny, make, monkeypatch):
    batcher = make(max_batch=4)
    from diffgen.denoise import runner as runner_mod

    real_step = runner_mod.denoise_step
    calls = []

    def fails_on_second_step(state, context):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the accelerator fell over")
        return real_step(state, context)

    monkeypatch.setattr(runner_mod, "denoise_step", fails_on_second_step)
    hold = threading.Event()
    hold.set()
    hold_at_boundaries(batcher, hold.is_set)
    tickets = {}
    cancelled = Recorder(lambda item: tickets["cancelled"].cancel() if kind(item) == "step" else None)
    other = Recorder()
    started = [threading.Event(), threading.Event()]
    tickets["cancelled"] = batcher.submit(ids(tiny, 0), [settings(tiny, 1, 16)], cancelled, observe=True,
                                          on_start=started[0].set)
    tickets["other"] = batcher.submit(ids(tiny, 1), [settings(tiny, 2, 16)], other, on_start=started[1].set)
    for event in started:  # both admitted before the first canvas: one batch
        event.wait()
    hold.clear()
    for ticket in tickets.values():
        ticket.wait()
    assert other.kinds() == ["error", "end"] and cancelled.kinds()[-1] == "end"
    counters = batcher.counters()
    assert counters.requests_failed == 1 and counters.requests_cancelled == 1


def exact_work(tiny, text: int, rows: list):
    """A solo request through the loop with the exact sampler, choice ``i`` under ``rows[i]`` (no
    ``Canvas`` items: a request that is not streamed)."""
    from diffgen.denoise import solo

    return lambda i: solo.loop_items(tiny, ids(tiny, text), rows[i], i, observe=False, execution=EXACT, canvases=False)


def test_a_solo_request_waits_for_the_batch_before_it_and_runs_its_choices_alone_in_order(tiny, make):
    batcher = make(max_batch=4)
    order: list[tuple[str, int]] = []

    def recorder(name: str) -> Recorder:
        return Recorder(lambda item: order.append((name, item.index)) if kind(item) == "done" else None)

    recorders = {name: recorder(name) for name in ("A", "S", "C")}
    solo_rows = [settings(tiny, 5, 32), settings(tiny, 6, 32)]
    hold = threading.Event()
    hold.set()
    hold_at_boundaries(batcher, hold.is_set)
    tickets = [batcher.submit(ids(tiny, 0), [settings(tiny, 1, 64)], recorders["A"]),
               batcher.submit_solo(exact_work(tiny, 1, solo_rows), 2, recorders["S"]),
               # C could share A's batch, but the solo request came first: C must not overtake it.
               batcher.submit(ids(tiny, 3), [settings(tiny, 3, 16)], recorders["C"])]
    hold.clear()
    for ticket in tickets:
        ticket.wait()
    assert order == [("A", 0), ("S", 0), ("S", 1), ("C", 0)]
    assert recorders["S"].kinds() == ["done", "done", "end"]
    expected = [loop.generate(tiny, [ids(tiny, 1)], row, execution=EXACT).completions[0] for row in solo_rows]
    assert [recorders["S"].done()[k].token_ids for k in range(2)] == [e.token_ids for e in expected]
    assert recorders["A"].done()[0].token_ids == alone(tiny, 0, 1, 64).token_ids
    counters = batcher.counters()
    assert counters.batches == 2 and counters.requests_served == 3 and counters.rows_served == 4
    solo_passes = sum(sum(e.stats.steps_per_canvas) for e in expected)
    assert counters.decoder_forwards == solo_passes + sum(
        sum(recorders[name].done()[0].stats.steps_per_canvas) for name in ("A", "C"))


def test_a_cancelled_solo_request_stops_after_its_canvas_and_its_waiting_choices_never_run(tiny, make):
    from diffgen.denoise import solo

    batcher = make(max_batch=2)
    tickets = {}
    rows = [settings(tiny, 1, 64), settings(tiny, 2, 64)]

    def work(i):
        return solo.loop_items(tiny, ids(tiny, 0), rows[i], i, observe=False, execution=EXACT, canvases=True)

    recorder = Recorder(lambda item: tickets["solo"].cancel() if kind(item) == "canvas" else None)
    started = threading.Event()
    tickets["solo"] = batcher.submit_solo(work, 2, recorder, on_start=started.set)
    tickets["solo"].wait()
    assert started.is_set() and recorder.kinds() == ["canvas", "end"]
    counters = batcher.counters()
    assert counters.decoder_forwards == 4  # one canvas of 4 steps, then it stopped; choice 1 never ran
    assert counters.requests_cancelled == 1 and counters.requests_served == counters.rows_served == 0
    assert counters.rows_queued == counters.requests_queued == counters.rows_in_flight == 0
    # Cancelled while it waits (the model busy elsewhere): it leaves the queue and never runs.
    batcher.lock.acquire()
    try:
        waiting = Recorder()
        ticket = batcher.submit_solo(work, 2, waiting)
        ticket.cancel()
    finally:
        batcher.lock.release()
    ticket.wait()
    assert waiting.kinds() == ["end"] and batcher.counters().decoder_forwards == 4
    assert batcher.counters().requests_cancelled == 2


def test_a_failing_solo_request_reports_and_the_scheduler_goes_on(tiny, make):
    batcher = make(max_batch=2)

    def broken(i):
        yield items.Canvas(i, "so far", None)
        raise RuntimeError("the accelerator fell over")

    failed = Recorder()
    batcher.submit_solo(broken, 2, failed).wait()
    assert failed.kinds() == ["canvas", "error", "end"] and "fell over" in str(failed.items[1].error)
    after = Recorder()
    batcher.submit(ids(tiny, 0), [settings(tiny, 3, 16)], after).wait()
    assert after.done()[0].token_ids == alone(tiny, 0, 3, 16).token_ids
    counters = batcher.counters()
    assert counters.requests_failed == 1 and counters.requests_served == 1 and counters.rows_queued == 0
