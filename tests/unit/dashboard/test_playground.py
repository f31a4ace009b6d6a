"""The playground's request parsing and checkpoint choice (no model: generation is faked)."""

from __future__ import annotations

import pytest

from llamahome.dashboard.playground import FieldError, Playground, SampleRequest, checkpoint_step
from llamahome.errors import UserError
from tests.unit.dashboard.fake_runs import write_run


def test_absent_and_null_fields_take_the_defaults():
    assert SampleRequest.from_json({}) == SampleRequest(step=None, prompt="")
    nulls = dict.fromkeys(["step", "max_new_tokens", "temperature", "top_k", "top_p", "seed"])
    assert SampleRequest.from_json(nulls) == SampleRequest(step=None, prompt="")


def test_a_full_request_is_read_as_sent_and_top_k_zero_is_off():
    body = {"step": 20, "prompt": "hi", "max_new_tokens": 1024, "temperature": 0,
            "top_k": 0, "top_p": 1, "seed": 2**32 - 1}
    assert SampleRequest.from_json(body) == SampleRequest(
        step=20, prompt="hi", max_new_tokens=1024, temperature=0.0, top_k=None, top_p=1.0,
        seed=2**32 - 1)


@pytest.mark.parametrize("body,field", [({"max_new_tokens": float("inf")}, "max_new_tokens"),
                                        ({"temperature": float("nan")}, "temperature"),
                                        ({"temperature": 10**400}, "temperature"),
                                        ({"top_p": float("-inf")}, "top_p"),
                                        ({"seed": False}, "seed")])
def test_non_finite_and_non_numeric_values_name_their_field(body, field):
    with pytest.raises(FieldError, match=f"^{field} must be") as raised:
        SampleRequest.from_json(body)
    assert raised.value.field == field


def test_only_a_committed_checkpoint_step_is_loaded(tmp_path):
    write_run(tmp_path, "r", checkpoints={10: 1, 20: 1})
    assert checkpoint_step(tmp_path / "r", None) == 20
    assert checkpoint_step(tmp_path / "r", 10) == 10
    with pytest.raises(UserError, match=r"no checkpoint at step 15; .* steps \[10, 20\]"):
        checkpoint_step(tmp_path / "r", 15)


def test_the_loaded_generator_is_reused_for_the_same_checkpoint(tmp_path):
    write_run(tmp_path, "r", checkpoints={10: 1})
    loads = []

    class Echo:
        def stream(self, prompt, max_new_tokens, **sampling):
            yield prompt

    def load(run_dir, step):
        loads.append(step)
        return Echo()

    playground = Playground(load=load)
    for prompt in ("a", "b"):
        assert list(playground.stream(tmp_path / "r", SampleRequest(step=None, prompt=prompt))) == [prompt]
    assert loads == [10]
