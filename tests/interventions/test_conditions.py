"""compose: conditions entered in order, restored in reverse, also on error."""

import contextlib

import pytest

from rope_leak.interventions.conditions import compose


def _recording(name, log):
    @contextlib.contextmanager
    def condition(model):
        log.append(f"enter {name}")
        try:
            yield model
        finally:
            log.append(f"exit {name}")

    return condition


def test_enters_in_order_and_exits_in_reverse_even_on_error():
    log = []
    with pytest.raises(RuntimeError), compose(_recording("a", log), None, _recording("b", log))("model"):
        raise RuntimeError("inside")
    assert log == ["enter a", "enter b", "exit b", "exit a"]


def test_no_condition_leaves_the_model_alone():
    with compose()("model") as model:
        assert model == "model"
