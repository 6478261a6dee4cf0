"""mqa.timing.alternating_medians: the rounds that side-by-side comparisons are timed in."""

import itertools

from mqa.timing import alternating_medians, timed


def test_every_round_calls_each_run_once_group_after_group():
    calls, values = [], {"a": itertools.cycle([3.0, 1.0, 2.0]), "b": itertools.repeat(5.0),
                         "c": itertools.cycle([4.0, 6.0, 8.0])}

    def run(key):
        def call():
            calls.append(key)
            return next(values[key])
        return call

    groups = {"a": "x", "b": "y", "c": "x"}
    medians = alternating_medians({key: run(key) for key in "abc"}, 3, group=groups.get)
    assert calls == ["a", "c", "b"] * 3
    assert medians == {"a": 2.0, "b": 5.0, "c": 6.0}


def test_timed_returns_the_seconds_a_call_took():
    import time
    seconds = timed(lambda: time.sleep(0.02))()
    assert 0.02 <= seconds < 1.0
