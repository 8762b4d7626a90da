"""Counter-based random numbers: every draw is a pure function of ``(key, index)``.

The generator is **Philox4x32-10** (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy
as 1, 2, 3", SC'11; the Random123 library). Why this one:

* it is the counter-based generator the GPU stack already trusts: ``triton.language.randint`` /
  ``tl.philox`` and torch's own CUDA generator are Philox4x32-10, and it passes TestU01's BigCrush;
* it is *keyed*: a 64-bit key selects one of 2^64 independent streams, so a key derived from
  ``(row seed, canvas, step, stream)`` gives every row and step its own stream with no state to
  carry, re-seed or advance (a captured CUDA graph can replay a step, and a row's draws do not
  depend on its neighbours or on how many steps ran before);
* one evaluation yields four 32-bit words, which amortises its ten rounds over four draws.

The Triton kernels (:mod:`diffgen.kernels.sampler`) call Philox themselves, and derive the keys
of :func:`step_keys` in the kernel from ``(row seed, canvas, step)`` (device tensors: nothing to
recompute per step in torch); this module is the torch implementation of the same function, bit for bit, in 32-bit unsigned arithmetic emulated on
int64 tensors (``& 0xFFFFFFFF``; a 32 x 32-bit product is formed in int64, whose wrap-around keeps
its low 64 bits, i.e. the exact product). ``tests/test_kernels_sampler.py`` checks it against
Random123's published known-answer vectors and against the kernel.

Layout of the draws (``key = (k0, k1)``, the int64 key's low and high 32-bit words):

* Gumbel noise for row ``b``, canvas position ``c``, token ``v``: word ``v & 3`` of
  ``philox(counter=(v >> 2, c, PURPOSE_GUMBEL, 0), key_b)``.
* Uniform token ``n`` of a row: word ``n & 3`` of ``philox(counter=(n >> 2, 0, PURPOSE_TOKENS, 0), key_b)``.
* A word ``w`` becomes a float uniform ``((w >> 9) + 0.5) * 2**-23``: 2^23 equally likely values
  strictly inside (0, 1) (from 2^-24 to 1 - 2^-24), each exact in float32, so ``log`` never sees 0
  or 1 and the kernel and torch convert identically.
* A word becomes a token in ``[0, vocab)`` by ``(w * vocab) >> 32`` (Lemire's multiply-shift:
  no division, no rejection loop, bias below ``vocab / 2**32``, i.e. < 6.1e-5 relative at 262,144).

Everything here is tensor operations only (no ``.item()``, no host sync, no Python branching on
values), so it works inside ``torch.compile`` and CUDA graph capture.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

#: ``stream`` values for :func:`step_keys`: one independent stream per use within a step.
STREAM_CANVAS = 1
STREAM_RENOISE = 2
STREAM_GUMBEL = 3

#: Third counter word, separating the kinds of draw made with one key.
PURPOSE_GUMBEL = 0
PURPOSE_TOKENS = 1
#: Fourth counter word of the key derivation, so derived keys never equal a draw of a row seed.
KEY_DOMAIN = 0x6B657973  # "keys"

PHILOX_ROUNDS = 10
_MASK = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
#: Uniform floats take the top 23 bits of a word: ``u = (w >> 9 + 0.5) * 2**-23``.
UNIFORM_SHIFT = 9
UNIFORM_SCALE = 2.0 ** -23


def philox4x32(c0: Tensor, c1: Tensor | int, c2: Tensor | int, c3: Tensor | int,
               k0: Tensor | int, k1: Tensor | int, rounds: int = PHILOX_ROUNDS
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32 on broadcastable int64 tensors holding 32-bit unsigned words.

    Args:
        c0, c1, c2, c3: the 128-bit counter as four words, int64 tensors (or ints) in
            ``[0, 2**32)``, broadcastable against each other and against the key.
        k0, k1: the 64-bit key as two words, same convention.
        rounds: Philox rounds (10 is the standard, and what ``tl.philox`` uses by default).

    Returns:
        The four output words, int64 tensors in ``[0, 2**32)`` of the broadcast shape.

    The round is Random123's (and ``triton.language.random.philox_impl``'s): the high halves of
    the two products are xored with the other counter words and the key, the low halves become
    the new odd words, and the key is bumped by the Weyl constants after every round.
    """
    # A product of two words is < 2**64: in int64 it wraps to its exact low 64 bits, so `>> 32`
    # (masked) is the high word and `& MASK` the low word. Intermediate words keep garbage above
    # bit 31 where only xors follow; every word is masked before it is multiplied or returned.
    k0 = k0 if isinstance(k0, int) else k0.to(torch.int64)
    k1 = k1 if isinstance(k1, int) else k1.to(torch.int64)
    for _ in range(rounds):
        p0 = c0 * _ROUND_A
        p2 = c2 * _ROUND_B
        c0, c1, c2, c3 = ((p2 >> 32) ^ c1 ^ k0) & _MASK, p2, ((p0 >> 32) ^ c3 ^ k1) & _MASK, p0
        k0 = (k0 + _KEY_A) & _MASK
        k1 = (k1 + _KEY_B) & _MASK
    return c0, c1 & _MASK, c2, c3 & _MASK


def split_keys(keys: Tensor) -> tuple[Tensor, Tensor]:
    """The low and high 32-bit words ``(k0, k1)`` of int64 keys, as int64 tensors in ``[0, 2**32)``."""
    keys = keys.to(torch.int64)
    return keys & _MASK, (keys >> 32) & _MASK


def join_keys(k0: Tensor, k1: Tensor) -> Tensor:
    """The int64 key whose low word is ``k0`` and high word ``k1`` (two's complement, no overflow)."""
    high = k1 - ((k1 >> 31) << 32)  # the high word as a signed 32-bit value
    return high * (1 << 32) + k0


def step_keys(row_seeds: Tensor, canvas: Tensor | int, step: Tensor | int, stream: int) -> Tensor:
    """One Philox key per row for one use (``stream``) at one step of one canvas.

    Args:
        row_seeds: int64 ``[B]``, each row's seed (any int64 value), on the device the draws
            will be made on.
        canvas: index of the canvas, from 0: a Python int or a 0-d integer tensor on the device
            (no host sync: it is only added to tensors).
        step: the step within the canvas (the loop's convention, e.g. 0 for the canvas's
            initial noise, then 1..N), int or 0-d integer tensor; any value in ``[0, 2**32)``.
        stream: which use, e.g. :data:`STREAM_CANVAS`, :data:`STREAM_RENOISE`,
            :data:`STREAM_GUMBEL` (any int in ``[0, 2**32)``).

    Returns:
        int64 ``[B]`` keys on ``row_seeds``'s device: ``philox(counter=(step, canvas, stream,
        DOMAIN), key=seed)``'s first two words, i.e. the row seed used as a Philox key to
        derive a fresh key (a keyed pseudo-random function, so nearby seeds, canvases and
        steps give unrelated keys). Tensor operations only: works under CUDA graph capture.
    """
    k0, k1 = split_keys(row_seeds)
    zero = torch.zeros_like(k0)
    w0, w1, _, _ = philox4x32((zero + step) & _MASK, (zero + canvas) & _MASK, zero + (stream & _MASK),
                              zero + KEY_DOMAIN, k0, k1)
    return join_keys(w0, w1)


def _quads(k0: Tensor, k1: Tensor, c1: Tensor | int, purpose: int, count: int) -> Tensor:
    """Words ``0..count-1`` of each stream: ``[*k0.shape, count]`` int64.

    Word ``n`` is word ``n & 3`` of ``philox(counter=(n >> 2, c1, purpose, 0), key)``;
    ``k0``, ``k1`` and ``c1`` carry the leading (row) dimensions and broadcast together.
    """
    quads = (count + 3) // 4
    q = torch.arange(quads, dtype=torch.int64, device=k0.device)
    words = torch.stack(torch.broadcast_tensors(*philox4x32(q, c1, purpose, 0, k0, k1)), dim=-1)
    return words.flatten(-2)[..., :count]


def uniform_from_words(words: Tensor) -> Tensor:
    """float32 uniforms strictly inside (0, 1) from 32-bit words: ``((w >> 9) + 0.5) * 2**-23``."""
    return ((words >> UNIFORM_SHIFT).to(torch.float32) + 0.5) * UNIFORM_SCALE


def uniform_tokens(keys: Tensor, length: int, vocab_size: int) -> Tensor:
    """Uniformly random tokens, int64 ``[B, length]`` in ``[0, vocab_size)``.

    Args:
        keys: int64 ``[B]`` from :func:`step_keys` (e.g. with :data:`STREAM_CANVAS` for a
            canvas's initial noise, :data:`STREAM_RENOISE` for renoising).
        length: tokens per row (the canvas length).
        vocab_size: tokens are drawn from ``[0, vocab_size)``; below 2**31.

    Token ``n`` of row ``b`` depends only on ``keys[b]`` and ``n``.
    """
    if not 0 < vocab_size < 2**31:
        raise ValueError(f"vocab_size must be in [1, 2**31), got {vocab_size}")
    k0, k1 = split_keys(keys)
    words = _quads(k0[:, None], k1[:, None], 0, PURPOSE_TOKENS, length)
    return (words * vocab_size) >> 32


def gumbel_rows(k0: Tensor, k1: Tensor, positions: Tensor, vocab_size: int) -> Tensor:
    """Gumbel noise for flattened rows: float32 ``[n, vocab_size]``.

    Args:
        k0, k1: int64 ``[n]``, the key words of each row's stream (:func:`split_keys`).
        positions: int64 ``[n]``, each row's canvas position (the counter's second word).
        vocab_size: V.

    Entry ``[i, v]`` is ``-log(-log(u))`` with ``u`` the uniform from word ``v & 3`` of
    ``philox(counter=(v >> 2, positions[i], PURPOSE_GUMBEL, 0), key_i)``.
    """
    words = _quads(k0[:, None], k1[:, None], positions[:, None], PURPOSE_GUMBEL, vocab_size)
    uniform = uniform_from_words(words)
    return uniform.log_().neg_().log_().neg_()


def gumbel(keys: Tensor, length: int, vocab_size: int) -> Tensor:
    """Standard Gumbel noise, float32 ``[B, length, vocab_size]`` — the reference the sampler's
    kernels reproduce (it materialises all of it: for tests and small shapes).

    Args:
        keys: int64 ``[B]`` from :func:`step_keys` with :data:`STREAM_GUMBEL`.
        length: canvas positions C.
        vocab_size: V.
    """
    batch = keys.shape[0]
    k0, k1 = split_keys(keys)
    positions = torch.arange(length, dtype=torch.int64, device=keys.device)
    rows = gumbel_rows(k0.repeat_interleave(length), k1.repeat_interleave(length), positions.repeat(batch),
                       vocab_size)
    return rows.view(batch, length, vocab_size)
