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


def test_a_second_thought_channel_never_leaks_into_the_answer(tiny):
    ids = _ids(tiny.tokenizer, "<|channel>thought\nfirst<channel|>Answer.<|channel>thought\nsecret")
    response = split_response(tiny.tokenizer, ids)
    assert response.text == "Answer."
    assert "secret" in response.thoughts and "first" in response.thoughts


def test_the_view_and_the_picture_split_where_the_answer_does(tiny):
    """One routing of tokens into thoughts and answer (denoise.channels.route) serves all three."""
    from diffgen.denoise.channels import ANSWER, THOUGHT, route
    from diffgen.records.trace import CanvasRecord, Trace, TokenTexts
    from diffgen.ui.picture import render_picture
    from diffgen.ui.view import DenoisingState

    ids = _ids(tiny.tokenizer, "<|channel>thought\nmusing<channel|>The answer.")
    texts = TokenTexts(tiny.tokenizer)
    where = route(ids, texts.channel_ids)
    assert where.count(None) == 2 and THOUGHT in where and where[-1] == ANSWER
    record = CanvasRecord(canvas=0, canvases=1, tokens=ids, texts=texts.texts(ids), steps=1, finished=True,
                          elapsed=0.1)
    state = DenoisingState(channel_ids=texts.channel_ids)
    state.update(record)
    thoughts, answer = state.split()
    response = split_response(tiny.tokenizer, ids)
    assert thoughts.plain.strip() == response.thoughts and answer.plain.strip() == response.text
    picture = render_picture(Trace({"channel_ids": list(texts.channel_ids), "prompt": "Q"}, [record], None))
    shown = [part.plain for part in picture.renderables if hasattr(part, "plain")]
    assert any("musing" in text and "answer" not in text for text in shown)
    assert any(text.strip() == "The answer." for text in shown)
