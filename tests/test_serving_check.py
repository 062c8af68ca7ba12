"""The gate's serving check: a fresh interpreter, started early, checks the model it is given and nothing else.

The passing path (a registered model loads and predicts before promotion) runs in tests/test_promotion.py, whose
gate keeps ``smoke_test`` on; here, the ways the pre-started interpreter is used, not used, and reports a failure.
"""

import logging

import pytest

from adaptflow import serving_check

ENV = {"ADAPTFLOW_TEST_MARK": "1"}
MISSING = "/nonexistent/adaptflow-model"  # a model URI that cannot load: the check must say so


def test_a_prestarted_interpreter_is_used_once_and_reports_the_model_failing(caplog):
    caplog.set_level(logging.INFO, logger="adaptflow")
    serving_check.prestart("check-test", ENV)
    with pytest.raises(RuntimeError, match="failed in a fresh process"):
        serving_check.check(MISSING, ENV, ["a text"], key="check-test", timeout=240)
    assert "pre-started, libraries imported" in caplog.text
    caplog.clear()
    # it was used up: another check under the same key starts its own interpreter
    with pytest.raises(RuntimeError, match="failed in a fresh process"):
        serving_check.check(MISSING, ENV, ["a text"], key="check-test", timeout=240)
    assert "started now" in caplog.text


def test_a_prestarted_interpreter_with_other_settings_is_not_used_and_discard_stops_it(caplog):
    caplog.set_level(logging.INFO, logger="adaptflow")
    serving_check.prestart("check-env", {**ENV, "ADAPTFLOW_TEST_MARK": "other"})
    with pytest.raises(RuntimeError):
        serving_check.check(MISSING, ENV, ["a text"], key="check-env", timeout=240)
    assert "started now" in caplog.text  # the check runs with the env it is given, never an older one

    serving_check.discard("never-started")  # nothing to stop: no error


def test_an_interpreter_nobody_asks_exits_on_its_own():
    idle = serving_check.ServingCheck(ENV)
    idle.process.stdin.close()  # what its parent exiting does
    assert idle.process.wait(timeout=240) == 0
    killed = serving_check.ServingCheck(ENV)
    killed.discard()
    assert not killed.alive() and killed.process.returncode != 0
