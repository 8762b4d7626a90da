"""``diffgen chat``'s KV-cache reuse: time to the first canvas of turn 5, with and without reuse.

Builds a random DiffusionGemma checkpoint with ``devtools/tiny.py``, wide and long enough that
encoding the conversation costs about as much as denoising a canvas (6 layers, 5 sliding-window
layers then a full one like the released model; canvas 64, window 256), then plays the same
scripted 5-turn chat (a long system prompt, long answers: every turn runs its whole token budget)
with the in-process chat backend twice per round: reusing the conversation's KV cache, and
encoding the whole conversation every turn. Same seeds, so both play nearly the same
conversation: encoding in pieces rounds floats differently (~1e-4 in the last layer's keys
here), which can flip a sampled token, so answers may differ in places and the prompts by a few
tokens (how many turns answered identically is printed). Prints each mode's median over the rounds of the
time from the turn's start (chat template included) to its first committed canvas, for every
turn, side by side, and the turn-5 figure; ``--json`` for a machine-readable line.

    python bench/chat_reuse.py            # ~50 s on a 2-core CPU, one thread
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SYSTEM = ("You are a patient assistant for a team that writes numerical software. Answer with care, cite the "
          "relevant numbers, and keep each answer self-contained. ") * 16
QUESTIONS = [
    "Why is the sky blue?",
    "And why are sunsets red, then?",
    "Summarise both answers in three short sentences, please.",
    "What would change on Mars?",
    "Write the main points as a list.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="conversations played per mode (median over them)")
    parser.add_argument("--steps", type=int, default=12, help="denoising steps per canvas (a random model never "
                                                               "stops early; the released model takes ~12-16)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="each answer's length (whole canvases)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from devtools.tiny import save_tiny_checkpoint
    from diffgen.cli.chat import LocalChat
    from diffgen.denoise.options import Execution
    from diffgen.loading.loader import load
    from diffgen.planning.plan import LoadPlan
    from diffgen.settings import GenerationSettings

    with tempfile.TemporaryDirectory() as directory:
        path = save_tiny_checkpoint(
            Path(directory) / "ckpt", seed=0, canvas_length=64, vocab_size=2048, hidden_size=256,
            intermediate_size=512, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            global_head_dim=64, num_experts=8, top_k_experts=2, moe_intermediate_size=128, sliding_window=256,
            layer_types=["sliding_attention"] * 5 + ["full_attention"], max_position_embeddings=8192)
        loaded = load(str(path), LoadPlan("cpu", "float32"), progress=False)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, max_denoising_steps=args.steps,
                                  eos_token_ids=(-1,), stability_threshold=None, confidence_threshold=None)

    def play(reuse: bool, turns: int = len(QUESTIONS)) -> tuple[list[float], list[str], list[int], list[int]]:
        backend = LocalChat(loaded, settings, execution=Execution(exact=True), reuse=reuse)
        messages = [{"role": "system", "content": SYSTEM}]
        firsts, answers, prompts, reused = [], [], [], []
        for turn, question in enumerate(QUESTIONS[:turns]):
            messages.append({"role": "user", "content": question})
            start = time.perf_counter()
            reply = None
            first = None
            for kind, value in backend.reply(messages, think=False, seed=1000 + turn):
                first = time.perf_counter() - start if first is None else first
                if kind == "done":
                    reply = value
            firsts.append(first)
            answers.append(reply.text)
            messages.append({"role": "assistant", "content": reply.text})
            last = backend.cache.last if backend.cache is not None else None
            prompts.append(last.prompt_tokens if last else 0)
            reused.append(last.reused_tokens if last else 0)
        return firsts, answers, prompts, reused

    play(True, turns=2)  # warm-up: first-call costs (allocator, kernels) out of the figures
    runs: dict[bool, list[list[float]]] = {True: [], False: []}
    answers: dict[bool, list[str]] = {}
    prompts: list[int] = []
    reused: list[int] = []
    for _ in range(args.rounds):
        for reuse in (True, False):  # interleaved: the machine's load falls on both alike
            firsts, texts, sizes, hits = play(reuse)
            runs[reuse].append(firsts)
            answers[reuse] = texts
            if reuse:
                prompts, reused = sizes, hits
    same = sum(a == b for a, b in zip(answers[True], answers[False]))
    median = {reuse: [statistics.median(run[turn] for run in runs[reuse]) for turn in range(len(QUESTIONS))]
              for reuse in (True, False)}
    if args.json:
        print(json.dumps({"turn5_first_canvas_s": {"reuse": median[True][4], "no_reuse": median[False][4]},
                          "per_turn_s": {"reuse": median[True], "no_reuse": median[False]},
                          "prompt_tokens": prompts, "reused_tokens": reused, "identical_answers": same,
                          "rounds": args.rounds, "steps": args.steps, "threads": args.threads,
                          "torch": torch.__version__}))
        return
    print(f"time to first canvas, median of {args.rounds} rounds ({args.steps} steps per canvas, "
          f"{args.threads} thread(s), torch {torch.__version__}); answers identical with and without reuse: "
          f"{same} of {len(QUESTIONS)} turns")
    print(f"{'turn':>4} {'prompt':>7} {'reused':>7} {'reuse':>9} {'no reuse':>9} {'speed-up':>9}")
    for turn in range(len(QUESTIONS)):
        with_, without = median[True][turn], median[False][turn]
        print(f"{turn + 1:>4} {prompts[turn]:>7} {reused[turn]:>7} {with_ * 1000:>7.0f} ms {without * 1000:>6.0f} ms "
              f"{without / with_:>8.2f}x")


if __name__ == "__main__":
    main()
