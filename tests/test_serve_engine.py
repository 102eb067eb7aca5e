"""Continuous batching (`llmops.serve.engine`) on a real tiny Llama: greedy answers equal a
plain `generate` token for token, whatever else decodes beside them and whenever they join."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

BUILD = {"hidden_size": 32, "layers": 2, "heads": 4, "intermediate_size": 64, "vocab_size": 300,
         "max_position_embeddings": 128, "seed": 0}
TEXTS = ["How do I reset my password? Open settings and choose reset password.",
         "Where is my order? Orders ship within two days of purchase.",
         "Can I get a refund? Refunds are possible within thirty days."] * 4
PROMPTS = [f"Question {i}: where is order {i * 7}?" + " please" * (i % 4) for i in range(10)]


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory):
    from llmops.serve.model import load_model
    from llmops.train.build import build_tiny_model

    out = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_model(BUILD, TEXTS, out)
    return load_model(out)


@pytest.fixture(scope="module")
def engine(lm):
    from llmops.serve.engine import ContinuousEngine

    eng = ContinuousEngine(lm, max_batch=4)
    yield eng
    eng.close()


def _alone(lm, prompt: str, max_new: int, stop=()) -> str:
    from llmops.serve.model import generate_batch

    return generate_batch(lm, [prompt], max_new_tokens=max_new, stop=list(stop))[0]


def _finish(lm, prompt: str, tokens: list[int], stop=()):
    from llmops.serve.model import finish_generated as _finish

    return _finish(lm, tokens, len(lm.encode(prompt)), list(stop))


def test_greedy_answers_equal_plain_generate_while_requests_join_and_leave(lm, engine) -> None:
    want = [_alone(lm, p, 6 + 3 * i) for i, p in enumerate(PROMPTS)]
    got: list = [None] * len(PROMPTS)

    def send(i: int) -> None:
        time.sleep(0.004 * i)  # staggered: later ones join sequences already decoding
        tokens = engine.generate([lm.encode(PROMPTS[i])], max_new_tokens=6 + 3 * i, timeout=60)[0]
        got[i] = _finish(lm, PROMPTS[i], tokens)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [(g.text, g.completion_tokens, g.finish_reason) for g in got] == \
        [(w.text, w.completion_tokens, w.finish_reason) for w in want]
    assert engine.largest > 1 and engine.running == 0  # they were in the engine together


def test_a_stop_string_ends_the_request_like_generate_does(lm, engine) -> None:
    prompt = PROMPTS[1]
    full = _alone(lm, prompt, 20).text
    assert len(full) > 6
    stop = [full[3:5]]
    want = _alone(lm, prompt, 20, stop)
    tokens = engine.generate([lm.encode(prompt)], max_new_tokens=20, stop=stop, timeout=60)[0]
    got = _finish(lm, prompt, tokens, stop)
    assert (got.text, got.finish_reason) == (want.text, "stop") == (full[:3], "stop")
    assert engine.running == 0


def test_a_timed_out_request_is_cancelled_and_the_engine_goes_on(lm, engine) -> None:
    from llmops.serve.engine import EngineError

    with pytest.raises(EngineError, match="timed out"):
        engine.generate([lm.encode(PROMPTS[2])], max_new_tokens=100, timeout=0.0001)
    assert engine.running == 0
    tokens = engine.generate([lm.encode(PROMPTS[2])], max_new_tokens=5, timeout=60)[0]
    assert _finish(lm, PROMPTS[2], tokens).text == _alone(lm, PROMPTS[2], 5).text


def test_the_cache_is_sized_for_the_batch_and_the_context() -> None:
    from llmops.serve.engine import PAGE_SIZE, CacheSize

    assert CacheSize(8, 128).blocks == 8 * 128 // PAGE_SIZE
    assert CacheSize(2, 2049).blocks == 2 * (2048 // PAGE_SIZE + 1)
