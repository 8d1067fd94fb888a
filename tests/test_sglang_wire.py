"""The SGLang wire format as pure functions: a request body in, validated arrays out (no server)."""

from __future__ import annotations

import numpy as np
import pytest

from slime_xvocab.sglang_wire import BadAnswer, build_request, dumps, loads, parse_answer


def answer(ids: list[int], start: int, lps: list[float], top_k: int = 0) -> dict:
    """What SGLang answers for ``logprob_start_len = start - 1``: a null entry, then one per response token."""
    itl = [[None, ids[start - 1], None]] + [[lp, t, None] for lp, t in zip(lps, ids[start:], strict=True)]
    meta = {"prompt_tokens": len(ids), "input_token_logprobs": itl}
    if top_k:
        meta["input_top_logprobs"] = [None] + [[[lp, t, None]] for lp, t in zip(lps, ids[start:], strict=True)]
    return {"text": "", "meta_info": meta}


def test_round_trip_single_and_batch():
    ids, start = [5, 6, 7, 8], 2
    body = build_request([(ids, start)], top_logprobs=1)
    assert body["logprob_start_len"] == 1 and body["top_logprobs_num"] == 1
    assert loads(dumps(body)) == body
    ((lps, top, temperature),) = parse_answer(answer(ids, start, [-0.5, -1.5], top_k=1), [(ids, start)], top_k=1)
    assert temperature == 1.0  # the server said nothing: T = 1
    np.testing.assert_array_equal(lps, np.float32([-0.5, -1.5]))
    assert [t[0].tolist() for t in top] == [[7], [8]]
    items = [(ids, 2), ([1, 2, 3], 1)]
    out = parse_answer([answer(ids, 2, [-1.0, -2.0]), answer([1, 2, 3], 1, [-3.0, -4.0])], items)
    assert [o[0].tolist() for o in out] == [[-1.0, -2.0], [-3.0, -4.0]]


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a["meta_info"]["input_token_logprobs"].pop(), r"len\(input_token_logprobs\)=2"),
        (lambda a: a["meta_info"]["input_token_logprobs"][-1].__setitem__(1, 99), "echoed token id at position 3"),
        (lambda a: a["meta_info"]["input_token_logprobs"][-1].__setitem__(0, 0.5), "offset 1 is 0.5"),
        (lambda a: a["meta_info"].__setitem__("prompt_tokens", 3), "prompt_tokens=3 but 4 input ids"),
    ],
)
def test_every_wrong_answer_is_a_bad_answer(mutate, message):
    ids = [5, 6, 7, 8]
    a = answer(ids, 2, [-0.5, -1.5])
    mutate(a)
    with pytest.raises(BadAnswer, match=message) as ei:
        parse_answer(a, [(ids, 2)])
    assert ei.value.index == 0 and ei.value.n_items == 1
    with pytest.raises(BadAnswer, match="batch answer has 1 items, 2 sequences were sent"):
        parse_answer([answer(ids, 2, [-0.5, -1.5])], [(ids, 2), (ids, 2)])


def test_top_k_is_read_position_by_position_and_bad_entries_are_named():
    rng = np.random.default_rng(0)
    ids, start = list(range(100, 140)), 10
    entries = [[[float(-rng.random() * 5), int(rng.integers(0, 1000)), None] for _ in range(int(rng.integers(1, 6)))]
               for _ in ids[start:]]
    a = answer(ids, start, [-0.5] * (len(ids) - start))
    a["meta_info"]["input_top_logprobs"] = [None] + entries
    ((_, top, _),) = parse_answer(a, [(ids, start)], top_k=5)
    assert len(top) == len(entries)
    for (t_ids, t_lps), entry in zip(top, entries, strict=True):  # the JSON, read entry by entry
        assert t_ids.tolist() == [e[1] for e in entry]
        np.testing.assert_allclose(t_lps, [e[0] for e in entry], rtol=1e-6)
    entries[7][0][0] = float("nan")
    with pytest.raises(BadAnswer, match="top-k logprob at response offset 7"):
        parse_answer(a, [(ids, start)], top_k=5)
    entries[7][0][0] = -1.0
    a["meta_info"]["input_top_logprobs"][1 + 3] = []
    with pytest.raises(BadAnswer, match="offset 3 should list 1..5 entries"):
        parse_answer(a, [(ids, start)], top_k=5)


def test_no_collection_sees_a_decoded_answer_and_pauses_nest_across_threads():
    """Decoding inside collector_paused triggers no collection even with a hair-trigger threshold; pauses
    nest and overlap across threads, and the collector is back on only when the last one ends."""
    import gc
    import threading

    from slime_xvocab.sglang_wire import collector_paused

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, 400).tolist()
    body = dumps(answer(ids, 1, (-rng.exponential(size=399)).tolist(), top_k=1))
    seen = []
    callback = lambda phase, info: seen.append(phase)  # noqa: E731
    threshold = gc.get_threshold()
    gc.callbacks.append(callback)
    gc.set_threshold(5)
    try:
        with collector_paused():
            seen.clear()  # a collection may run on the way in, before the pause
            ((lps, top, _),) = parse_answer(loads(body), [(ids, 1)], top_k=1)
            entered, leave = threading.Event(), threading.Event()

            def other():
                with collector_paused():
                    entered.set()
                    leave.wait(5)

            worker = threading.Thread(target=other)
            worker.start()
            entered.wait(5)
        assert not gc.isenabled()  # the other thread's pause is still open
        assert seen == []  # nothing was collected while the answer was decoded, checked and held
        leave.set()
        worker.join(5)
        assert gc.isenabled()
        assert len(lps) == 399 and len(top) == 399
    finally:
        gc.set_threshold(*threshold)
        gc.callbacks.remove(callback)
        gc.enable()
