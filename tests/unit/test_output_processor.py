"""Output processor: incremental text, stop strings, stream hold-back, n choices, best_of."""

from __future__ import annotations

from tessera.core.engine.output_processor import OutputProcessor, child_request_ids
from tessera.core.engine.types import EngineCoreOutput, TokenLogprobs
from tessera.core.sampling_params import SamplingParams


def _feed(processor, child_id, token_ids, finish=None, stop_reason=None, logprobs=None):
    outputs = []
    for i, token in enumerate(token_ids):
        last = i == len(token_ids) - 1
        outputs.append(
            EngineCoreOutput(
                child_id, [token],
                new_logprobs=[logprobs[i]] if logprobs else None,
                finish_reason=finish if last else None,
                stop_reason=stop_reason if last else None,
            )
        )
    results, to_finish = [], []
    for out in outputs:
        r, f = processor.process([out])
        results += r
        to_finish += f
    return results, to_finish


def _add(processor, tokenizer, params, request_id="r", stream=False, logprobs=False):
    params.best_of = params.best_of or params.n
    children = child_request_ids(request_id, params.best_of)
    processor.add_request(request_id, None, [1, 2], params, children, stream, logprobs)
    return children


def test_stream_deltas_concatenate_to_the_full_text(smollm2_tokenizer):
    text = "Paris is the capital of France. 🇫🇷 Ça va?"
    ids = smollm2_tokenizer.encode(text)
    full_proc, stream_proc = OutputProcessor(smollm2_tokenizer), OutputProcessor(smollm2_tokenizer)
    (child,) = _add(full_proc, smollm2_tokenizer, SamplingParams())
    full, _ = _feed(full_proc, child, ids, finish="length")
    (child,) = _add(stream_proc, smollm2_tokenizer, SamplingParams(), stream=True)
    deltas, _ = _feed(stream_proc, child, ids, finish="length")
    assert len(full) == 1 and full[0].outputs[0].text == text
    assert "".join(d.outputs[0].text for d in deltas) == text
    assert sum(len(d.outputs[0].token_ids) for d in deltas) == len(ids)
    assert deltas[-1].finished and deltas[-1].outputs[0].finish_reason == "length"


def test_stop_string_truncates_and_asks_the_core_to_finish(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("one two three four five")
    processor = OutputProcessor(smollm2_tokenizer)
    (child,) = _add(processor, smollm2_tokenizer, SamplingParams(stop=["three"]))
    results, to_finish = _feed(processor, child, ids)
    assert to_finish == [child]
    assert results[-1].outputs[0].text == "one two "
    assert results[-1].outputs[0].finish_reason == "stop"
    assert results[-1].outputs[0].stop_reason == "three"


def test_stop_string_kept_with_include_stop_str_in_output(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("one two three four")
    processor = OutputProcessor(smollm2_tokenizer)
    (child,) = _add(processor, smollm2_tokenizer, SamplingParams(stop=["two"], include_stop_str_in_output=True))
    results, _ = _feed(processor, child, ids)
    assert results[-1].outputs[0].text == "one two"


def test_streaming_never_emits_text_that_a_stop_string_removes(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("alpha beta gamma delta")
    processor = OutputProcessor(smollm2_tokenizer)
    (child,) = _add(processor, smollm2_tokenizer, SamplingParams(stop=[" gamma"]), stream=True)
    deltas, _ = _feed(processor, child, ids)
    assert "".join(d.outputs[0].text for d in deltas) == "alpha beta"


def test_stop_token_text_is_hidden(smollm2_tokenizer):
    ids = smollm2_tokenizer.encode("hello world")
    processor = OutputProcessor(smollm2_tokenizer)
    (child,) = _add(processor, smollm2_tokenizer, SamplingParams(stop_token_ids=[ids[-1]]))
    results, _ = _feed(processor, child, ids, finish="stop", stop_reason=ids[-1])
    assert results[-1].outputs[0].text == "hello"
    assert results[-1].outputs[0].stop_reason == ids[-1]


def test_n_choices_are_fanned_in_by_index(smollm2_tokenizer):
    processor = OutputProcessor(smollm2_tokenizer)
    children = _add(processor, smollm2_tokenizer, SamplingParams(n=2))
    a, b = smollm2_tokenizer.encode("first"), smollm2_tokenizer.encode("second")
    first, _ = _feed(processor, children[0], a, finish="length")
    assert first == []  # not finished until every choice is
    results, _ = _feed(processor, children[1], b, finish="length")
    assert [o.text for o in results[-1].outputs] == ["first", "second"]
    assert [o.index for o in results[-1].outputs] == [0, 1]


def test_best_of_returns_the_most_likely_candidates(smollm2_tokenizer):
    processor = OutputProcessor(smollm2_tokenizer)
    children = _add(processor, smollm2_tokenizer, SamplingParams(n=1, best_of=2))
    low = [TokenLogprobs((5,), (-3.0,), (2,))]
    high = [TokenLogprobs((6,), (-0.1,), (1,))]
    _feed(processor, children[0], [5], finish="length", logprobs=low)
    results, _ = _feed(processor, children[1], [6], finish="length", logprobs=high)
    (output,) = results[-1].outputs
    assert output.token_ids == [6] and output.index == 0
    assert output.logprobs is None  # logprobs were not asked for


def test_abort_finishes_every_choice(smollm2_tokenizer):
    processor = OutputProcessor(smollm2_tokenizer)
    _add(processor, smollm2_tokenizer, SamplingParams(n=2), stream=True)
    final = processor.abort("r")
    assert final.finished and {o.finish_reason for o in final.outputs} == {"abort"}
    assert processor.trackers == {} and processor.parent_of == {}
