"""Debian's Chromium, headless, for the tests that open a page as a reader would.

Selenium drives it through the system's chromedriver, named explicitly, so Selenium Manager
(which would look for or download a browser and a driver) is never asked: ``chromium_page``
makes any call to it fail. ``screenshot`` uses Chromium's own ``--screenshot`` (no driver).

    python tests/browser.py docs/report.png     # the README's screenshot, from a tiny trained store
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
# Headless, no sandbox (tests may run as root in a container), and nothing that reaches the network.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")


def skip_without_chromium() -> None:
    """Skip the calling test unless Chromium, its driver and Selenium are installed."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install chromium chromium-driver)")
    pytest.importorskip("selenium")


@contextmanager
def chromium_page(page: Path, profile: Path, monkeypatch: pytest.MonkeyPatch
                  ) -> Iterator[tuple[Any, Callable[[], list[dict]]]]:
    """``page`` open in headless Chromium with a fresh profile: (the WebDriver, a function
    returning the console's entries so far)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("Selenium Manager was asked for a browser or a driver; it must never download one")

    monkeypatch.setattr(SeleniumManager, "binary_paths", refuse)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.get(page.resolve().as_uri())
        yield driver, lambda: driver.get_log("browser")
    finally:
        driver.quit()


def screenshot(page: Path, png: Path, *, width: int = 1280, height: int = 2000) -> None:
    """The top ``width`` x ``height`` pixels of ``page`` as ``png``, by headless Chromium."""
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "--hide-scrollbars",
                        f"--window-size={width},{height}", f"--screenshot={png.resolve()}", page.resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)


def _sample(png: Path) -> None:
    """A report over a tiny trained store (tests/tinystore.py), photographed as ``png``."""
    from rm_sweep import report

    from tinystore import build_filled

    models = [{"name": "source", "seed": 0}, {"name": "normal", "seed": 1},
              {"name": "shallow", "shallow_ratio": [0.5, 0.7], "seed": 1},
              {"name": "other_mask", "shallow_ratio": 0.5, "seed": 2, "mask_seed": 1}]
    matrix = [{"sources": ["source"], "targets": ["normal", "shallow", "other_mask"],
               "attacks": ["madry_fgsm", "madry_pgd", "pgd16"], "protocols": ["black"]},
              {"sources": ["source"], "targets": ["normal", "shallow", "other_mask"], "attacks": ["pgd16"],
               "protocols": ["gray"]},
              {"targets": ["source", "shallow"], "attacks": ["fgsm1", "pgd1"], "protocols": ["white"]},
              {"targets": ["shallow"], "sigmas": [8], "protocols": ["noise"]}]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = build_filled(root, root / "data", models, matrix)[1]
        out = root / "report" / "report.html"
        report.main(["--store", store.uri, "--out", str(out), "--data", f"folder:{root / 'tinted'}",
                     "--data-dir", str(root / "data")])
        screenshot(out, png)


if __name__ == "__main__":
    _sample(Path(sys.argv[1]))
