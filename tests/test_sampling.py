"""The sampler's policies on hand-built logits and entropies."""

import math

import pytest
import torch

from diffgen.denoise.step import StepContext, denoise_step, initial_state
from diffgen.denoise.sampling import (
    GlobalNoise,
    TemperatureSchedule,
    entropy_bound_acceptance,
    renoise,
    token_entropy,
)


def test_temperature_is_linear_from_t_max_to_t_min():
    schedule = TemperatureSchedule(t_min=0.4, t_max=0.8, max_steps=4)
    values = [schedule.value(n) for n in (4, 3, 2, 1)]
    assert values == pytest.approx([0.8, 0.7, 0.6, 0.5])


def test_temperature_tensor_matches_reference_formula_bitwise():
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        LinearTemperatureScheduleLogitsProcessor,
    )

    schedule = TemperatureSchedule(t_min=0.37, t_max=1.13, max_steps=48)
    reference = LinearTemperatureScheduleLogitsProcessor(t_min=0.37, t_max=1.13, max_denoising_steps=48)
    logits = torch.randn(2, 5, 11)
    for n in range(48, 0, -1):
        step = torch.tensor(n, dtype=torch.int32)
        assert torch.equal(logits / schedule(step), reference(None, logits, cur_step=step))


def test_entropy_of_uniform_and_one_hot():
    logits = torch.zeros(1, 2, 8)
    logits[0, 1, 3] = 1e4  # effectively one-hot
    entropy = token_entropy(logits)
    assert entropy[0, 0].item() == pytest.approx(math.log(8))
    assert entropy[0, 1].item() == pytest.approx(0.0, abs=1e-6)


def test_entropy_is_bitwise_the_reference_categorical_entropy():
    logits = torch.randn(3, 16, 97) * 4
    expected = torch.distributions.Categorical(logits=logits).entropy()
    assert torch.equal(token_entropy(logits), expected)


def test_acceptance_takes_lowest_entropies_within_the_bound():
    accept = entropy_bound_acceptance(0.1)
    # sorted: 0.01, 0.02, 0.05, 0.3, 2.0 -> cumsum - self: 0, .01, .03, .08, .38
    entropy = torch.tensor([[0.3, 0.01, 2.0, 0.05, 0.02]])
    assert accept(entropy).tolist() == [[True, True, False, True, True]]


def test_acceptance_always_takes_the_lowest_entropy_token():
    accept = entropy_bound_acceptance(1e-6)
    entropy = torch.tensor([[5.0, 3.0, 4.0], [1.0, 1.0 + 1e-3, 9.0]])
    assert accept(entropy).tolist() == [[False, True, False], [True, False, False]]


def test_larger_bound_accepts_more():
    entropy = torch.rand(4, 64)
    counts = [int(entropy_bound_acceptance(b)(entropy).sum()) for b in (0.05, 0.5, 5.0, 500.0)]
    assert counts == sorted(counts) and counts[-1] == 4 * 64


class ScriptedSampler:
    """A sampler whose every draw is given: the step's draft and each row's per-token entropy, so
    the adaptive stop of :func:`denoise_step` (the one the loop and the batcher run) sees them as is."""

    softcap = None

    def __init__(self):
        self.next: tuple[torch.Tensor, torch.Tensor] | None = None

    def draw(self, raw, temperature, *, active, canvas, step, out_dtype, capped=False):
        draft, entropy = self.next
        return draft, draft, entropy, torch.zeros((*draft.shape, 4))

    def renoise(self, accepted_canvas, accepted, *, active, canvas, step):
        return accepted_canvas


class StepStop:
    """One canvas's steps through :func:`denoise_step`; each call is a step, returns the rows stopped."""

    def __init__(self, stability_window: int, confidence_threshold: float, rows: int, width: int):
        self.sampler = ScriptedSampler()
        self.context = StepContext(
            decoder=lambda canvas, *_: torch.zeros((*canvas.shape, 4)), sampler=self.sampler,
            temperatures=torch.ones(16), accept=lambda entropy: torch.ones_like(entropy, dtype=torch.bool),
            stability_window=stability_window, confidence_threshold=confidence_threshold,
            finished=torch.zeros(rows, dtype=torch.bool), canvas_index=torch.tensor(0), embed_dtype=torch.float32)
        self.rows, self.width = rows, width
        self.reset()

    def reset(self) -> None:
        """A new canvas: the stop's history starts empty."""
        self.state = initial_state(self.context, torch.zeros((self.rows, self.width), dtype=torch.long),
                                   torch.zeros(self.rows, dtype=torch.int))

    def __call__(self, draft: torch.Tensor, mean_entropy: torch.Tensor) -> torch.Tensor:
        self.sampler.next = (draft, mean_entropy[:, None].expand(draft.shape).clone())
        self.state = denoise_step(self.state, self.context)
        return self.state.stopped


def test_stop_needs_a_stable_draft_and_low_entropy():
    stop = StepStop(stability_window=1, confidence_threshold=0.1, rows=2, width=3)
    draft = torch.tensor([[1, 2, 3], [4, 5, 6]])
    low = torch.tensor([0.01, 0.01])
    assert stop(draft, low).tolist() == [False, False]  # nothing to compare with yet
    changed = torch.tensor([[1, 2, 3], [4, 5, 7]])
    assert stop(changed, low).tolist() == [True, False]
    # A stable draft with a high entropy does not stop (the step's stop is sticky: a new canvas).
    stop.reset()
    assert stop(changed, low).tolist() == [False, False]
    assert stop(changed, torch.tensor([0.5, 0.01])).tolist() == [False, True]


def test_stop_with_longer_stability_window_and_reset():
    stop = StepStop(stability_window=2, confidence_threshold=1.0, rows=1, width=2)
    draft = torch.tensor([[7, 7]])
    low = torch.tensor([0.0])
    assert [stop(draft, low).item() for _ in range(4)] == [False, False, True, True]
    stop.reset()
    assert stop(draft, low).item() is False


def test_stability_zero_means_confidence_alone():
    stop = StepStop(stability_window=0, confidence_threshold=0.2, rows=2, width=1)
    assert stop(torch.tensor([[1], [2]]), torch.tensor([0.1, 0.3])).tolist() == [True, False]


def test_renoise_keeps_accepted_and_redraws_the_rest():
    torch.manual_seed(0)
    noise = GlobalNoise(vocab_size=1000, canvas_length=6, device=torch.device("cpu"))
    canvas = torch.full((2, 6), 999_999)
    accepted = torch.tensor([[True, False, True, False, False, True], [False] * 6])
    out = renoise(canvas, accepted, noise)
    assert (out[accepted] == 999_999).all()
    assert (out[~accepted] < 1000).all()
