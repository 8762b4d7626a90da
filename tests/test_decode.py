"""Splitting generated ids into the answer and the thought channel."""

from diffgen.denoise.channels import split_response


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_answer_only(tiny):
    response = split_response(tiny.tokenizer, _ids(tiny.tokenizer, "The sky is blue."))
    assert response.text == "The sky is blue."
    assert response.thoughts is None


def test_thoughts_never_reach_the_answer(tiny):
    ids = _ids(tiny.tokenizer, "<|channel>thought\nshort wavelengths scatter<channel|>Because of scattering.<turn|>")
    response = split_response(tiny.tokenizer, ids)
    assert response.text == "Because of scattering."
    assert response.thoughts == "short wavelengths scatter"


def test_unclosed_channel_is_all_thoughts(tiny):
    ids = _ids(tiny.tokenizer, "<|channel>thought\nstill thinking when the length ran out")
    response = split_response(tiny.tokenizer, ids)
    assert response.text == ""
    assert response.thoughts == "still thinking when the length ran out"


def test_special_tokens_are_dropped_from_the_answer(tiny):
    response = split_response(tiny.tokenizer, _ids(tiny.tokenizer, "<|turn>Hi<turn|>") + [0, 0])
    assert response.text == "Hi"
