"""Renamed settings (issue 10: one name per batch concept, ARCHITECTURE.md "Terms"): the new environment name sets
the value, the old one still does (converted where the unit changed) and logs a deprecation warning, and the
new one wins when both are set. Also the purge's old command-line flag."""

from __future__ import annotations

import logging

import pytest

from command_line.main import build_parser
from site_activity.settings import ENV_PREFIX, RENAMED_SETTINGS, Settings

# (old name, old env value, new name, new env value, the value the old env value means, the value of the new one)
CASES = [
    ("max_events_per_batch", "42", "max_events_per_request", "43", 42, 43),
    ("sink_batch_max_ms", "300", "sink_batch_max_s", "0.4", 0.3, 0.4),
    ("processors_producer_batch_bytes", "1", "processors_producer_batch_size", "2", 1, 2),
    ("purge_batch_rows", "7", "purge_chunk_rows", "8", 7, 8),
]
IDS = [c[0] for c in CASES]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No renamed setting from the outer environment, under either name."""
    for old, (new, _) in RENAMED_SETTINGS.items():
        monkeypatch.delenv(ENV_PREFIX + old.upper(), raising=False)
        monkeypatch.delenv(ENV_PREFIX + new.upper(), raising=False)


def deprecations(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "site_activity.settings" and r.levelno == logging.WARNING]


def test_every_case_is_a_renamed_setting_and_every_new_name_a_field() -> None:
    assert {c[0] for c in CASES} == set(RENAMED_SETTINGS)
    for old, (new, _) in RENAMED_SETTINGS.items():
        assert new in Settings.model_fields and old not in Settings.model_fields


@pytest.mark.parametrize(("old", "old_env", "new", "new_env", "old_value", "new_value"), CASES, ids=IDS)
def test_the_new_name_sets_the_value_without_a_warning(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    old: str,
    old_env: str,
    new: str,
    new_env: str,
    old_value: object,
    new_value: object,
) -> None:
    monkeypatch.setenv(ENV_PREFIX + new.upper(), new_env)
    with caplog.at_level(logging.WARNING, logger="site_activity.settings"):
        assert getattr(Settings(), new) == new_value
    assert deprecations(caplog) == []


@pytest.mark.parametrize(("old", "old_env", "new", "new_env", "old_value", "new_value"), CASES, ids=IDS)
def test_the_old_name_still_sets_the_value_and_logs_a_deprecation(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    old: str,
    old_env: str,
    new: str,
    new_env: str,
    old_value: object,
    new_value: object,
) -> None:
    monkeypatch.setenv(ENV_PREFIX + old.upper(), old_env)
    with caplog.at_level(logging.WARNING, logger="site_activity.settings"):
        settings = Settings()
    assert getattr(settings, new) == old_value
    assert settings.model_fields_set >= {new}
    [warning] = deprecations(caplog)
    assert warning.getMessage() == f"deprecated setting {ENV_PREFIX}{old.upper()}: use {ENV_PREFIX}{new.upper()}"
    assert (warning.old, warning.new, warning.ignored) == (  # type: ignore[attr-defined]
        ENV_PREFIX + old.upper(),
        ENV_PREFIX + new.upper(),
        False,
    )
    # A child process started with these settings sees only the new name, with the value the old one meant.
    assert settings.to_env()[ENV_PREFIX + new.upper()] == str(old_value)
    assert ENV_PREFIX + old.upper() not in settings.to_env()


@pytest.mark.parametrize(("old", "old_env", "new", "new_env", "old_value", "new_value"), CASES, ids=IDS)
def test_the_new_name_wins_when_both_are_set(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    old: str,
    old_env: str,
    new: str,
    new_env: str,
    old_value: object,
    new_value: object,
) -> None:
    monkeypatch.setenv(ENV_PREFIX + old.upper(), old_env)
    monkeypatch.setenv(ENV_PREFIX + new.upper(), new_env)
    with caplog.at_level(logging.WARNING, logger="site_activity.settings"):
        assert getattr(Settings(), new) == new_value
    [warning] = deprecations(caplog)
    assert warning.ignored is True  # type: ignore[attr-defined]
    assert "ignored" in warning.getMessage()


def test_old_environment_names_are_matched_case_insensitively_like_the_new_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("site_activity_purge_batch_rows", "9")
    assert Settings().purge_chunk_rows == 9


def test_an_old_keyword_is_mapped_too(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="site_activity.settings"):
        assert Settings(sink_batch_max_ms=100).sink_batch_max_s == 0.1  # type: ignore[call-arg]
    assert len(deprecations(caplog)) == 1


def test_a_bad_old_value_is_a_validation_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_PREFIX + "SINK_BATCH_MAX_MS", "soon")
    with pytest.raises(ValueError, match="soon"):
        Settings()


def test_the_purge_flag_keeps_its_old_name(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    assert parser.parse_args(["purge", "--chunk-rows", "5"]).chunk_rows == 5
    assert capsys.readouterr().err == ""
    assert parser.parse_args(["purge", "--batch-rows", "6"]).chunk_rows == 6
    assert "--batch-rows is deprecated, use --chunk-rows" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["purge", "--help"])
    shown = capsys.readouterr().out
    assert "--chunk-rows" in shown and "--batch-rows" not in shown  # the old name is not advertised
