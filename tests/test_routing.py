"""Routes and the token-level mixture, against direct probability arithmetic."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slime_xvocab.routing import mix_log_probs, normalise_route, route_of

TEACHERS = ("math", "code", "chat")


def test_routes_normalise_weights_in_configured_order():
    assert normalise_route("code", TEACHERS) == (("code", 1.0),)
    assert normalise_route({"math": 3, "chat": 1}, TEACHERS) == (("math", 0.75), ("chat", 0.25))


@pytest.mark.parametrize(
    "value,message",
    [
        ("poetry", "'poetry' is not a configured teacher"),
        ({"math": 0}, "weight of teacher 'math' must be a finite number > 0"),
        ({"math": float("nan")}, "finite number > 0"),
        ({"math": True}, "finite number > 0"),
        ({}, "non-empty mapping"),
        (3, "non-empty mapping"),
    ],
)
def test_bad_routes_say_what_is_wrong(value, message):
    with pytest.raises(ValueError, match=message):
        normalise_route(value, TEACHERS)


def test_route_of_a_sample():
    routes = {"gsm8k": (("math", 1.0),), "1": (("code", 1.0),)}
    default = (("chat", 1.0),)
    assert route_of({"source": "gsm8k"}, "source", routes, default) == ((("math", 1.0),), True)
    assert route_of({"source": 1}, "source", routes, default) == ((("code", 1.0),), True)  # YAML 1 == "1"
    assert route_of({"source": "poetry"}, "source", routes, default) == (default, False)
    assert route_of({}, "source", routes, default) == (default, False)
    assert route_of(None, "source", routes, default) == (default, False)
    assert route_of({"info": {"source": "gsm8k"}}, "info.source", routes, default) == ((("math", 1.0),), True)
    assert route_of({"source": "gsm8k"}, None, routes, default) == (default, True)  # no route key: all default


@settings(max_examples=60, deadline=None)
@given(
    probs=st.lists(st.lists(st.floats(1e-6, 1.0), min_size=5, max_size=5), min_size=1, max_size=4),
    weights=st.lists(st.floats(0.01, 10.0), min_size=4, max_size=4),
    mask_bits=st.lists(st.lists(st.booleans(), min_size=5, max_size=5), min_size=4, max_size=4),
)
def test_the_mixture_is_the_renormalised_weighted_mean_of_probabilities(probs, weights, mask_bits):
    k = len(probs)
    p = np.array(probs)
    w = np.array(weights[:k])
    ok = np.array(mask_bits[:k])
    own = np.full(5, -0.5)
    got, scored = mix_log_probs(list(np.log(p)), list(ok), list(w), own)
    for j in range(5):
        present = ok[:, j]
        assert scored[j] == present.any()
        if present.any():
            want = (w[present] * p[present, j]).sum() / w[present].sum()  # plain arithmetic in probability space
            assert got[j] == pytest.approx(np.log(want), abs=1e-5)
        else:
            assert got[j] == np.float32(-0.5)


def test_the_mixture_is_stable_at_extreme_log_probs():
    values = [np.array([-1000.0, -1e-9, -50.0]), np.array([-1001.0, -2e-9, -np.inf])]
    scored = [np.ones(3, bool), np.array([True, True, False])]
    got, _ = mix_log_probs(values, scored, [0.5, 0.5], np.zeros(3))
    assert np.isfinite(got).all()
    assert got[0] == pytest.approx(-1000.0 + np.log((1 + np.exp(-1.0)) / 2), abs=1e-4)
    assert got[1] == pytest.approx(-1.5e-9, abs=1e-7)
    assert got[2] == pytest.approx(-50.0)  # the second teacher abstains there: the first one's value
    assert mix_log_probs([], [], [], np.array([-0.25]))[0].tolist() == [-0.25]
