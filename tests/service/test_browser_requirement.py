"""The switch that keeps CI from skipping the browser tests: without a Chromium they skip,
unless STEERSERVE_REQUIRE_BROWSER=1 makes that a failure."""

import pytest

from tests.service import browser as browser_setup


def test_a_missing_browser_skips_by_default(monkeypatch):
    monkeypatch.setenv("STEERSERVE_CHROMIUM", "/nonexistent/chromium")
    monkeypatch.delenv("STEERSERVE_REQUIRE_BROWSER", raising=False)
    assert browser_setup.find_chromium() is None
    with pytest.raises(pytest.skip.Exception):
        browser_setup._unavailable("no Chromium found")


def test_a_missing_browser_fails_when_required(monkeypatch):
    monkeypatch.setenv("STEERSERVE_CHROMIUM", "/nonexistent/chromium")
    monkeypatch.setenv("STEERSERVE_REQUIRE_BROWSER", "1")
    with pytest.raises(pytest.fail.Exception, match="STEERSERVE_REQUIRE_BROWSER=1 but no Chromium found"):
        browser_setup._unavailable("no Chromium found")


def test_an_installed_browser_is_found(monkeypatch, tmp_path):
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\n")
    monkeypatch.setenv("STEERSERVE_CHROMIUM", str(fake))
    assert browser_setup.find_chromium() == str(fake)
    monkeypatch.delenv("STEERSERVE_CHROMIUM")
    monkeypatch.setenv("PATH", str(tmp_path))
    fake.chmod(0o755)
    assert browser_setup.find_chromium() == str(fake)
