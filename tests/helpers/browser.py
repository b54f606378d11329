"""Headless Chromium for tests, driven by Selenium through Debian's chromedriver.

Needs the Debian packages ``chromium`` and ``chromium-driver`` (``make sysdeps``); the
``chromium`` fixture in ``conftest.py`` skips with the reason otherwise. Selenium gets both
paths, so Selenium Manager never runs (it would download a driver), and nothing here
reaches beyond the loopback interface.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.proxy import Proxy, ProxyType
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

HOW_TO_INSTALL = (
    "install the Debian packages `chromium` and `chromium-driver` (`make sysdeps` does it as root)"
)
# Headless, as root in a container, and quiet: no updates, sync, pings or QUIC probes.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
    # Only loopback resolves: no DNS query leaves (search-engine preconnect, update checks).
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE localhost , EXCLUDE 127.0.0.1",
)


def _executable(*candidates: str) -> str | None:
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    return None


def find_chromium() -> str | None:
    return _executable("chromium", "/usr/bin/chromium", "chromium-browser")


def find_chromedriver() -> str | None:
    return _executable("chromedriver", "/usr/bin/chromedriver")


def missing() -> str | None:
    """Why headless Chromium cannot run here, or None when it can."""
    absent = [
        what
        for what, path in (("Chromium", find_chromium()), ("chromedriver", find_chromedriver()))
        if path is None
    ]
    return f"{' and '.join(absent)} not found: {HOW_TO_INSTALL}" if absent else None


def start_chromium(profile: Path, log: Path, size: tuple[int, int] = (1600, 1000)) -> WebDriver:
    """A headless Chromium with its own profile folder; chromedriver logs to ``log``."""
    chromium, chromedriver = find_chromium(), find_chromedriver()
    if not (chromium and chromedriver):
        raise RuntimeError(missing())
    os.environ["SE_AVOID_STATS"] = "true"  # Selenium Manager does not run; if it did: no stats
    # Nor do Selenium's own requests to chromedriver on loopback go through a proxy.
    no_proxy = [p for p in os.environ.get("no_proxy", "").split(",") if p]
    os.environ["no_proxy"] = ",".join(dict.fromkeys([*no_proxy, "localhost", "127.0.0.1"]))
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}"):
        options.add_argument(flag)
    options.proxy = Proxy({"proxyType": ProxyType.DIRECT})  # the browser: no proxy either
    service = webdriver.ChromeService(executable_path=chromedriver, log_output=str(log))
    return webdriver.Chrome(options=options, service=service)


def page_text(driver: WebDriver) -> str:
    """The page's text as a person reads it."""
    return driver.find_element(By.TAG_NAME, "body").text


def wait_until(
    driver: WebDriver, condition: Callable[[WebDriver], Any], what: str, timeout: float = 60
) -> Any:
    """``condition``'s first truthy value; fails naming ``what`` after ``timeout`` seconds."""
    return WebDriverWait(driver, timeout).until(
        condition, f"page never showed {what} within {timeout}s"
    )
