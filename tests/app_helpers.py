"""Helpers of tests/test_app.py: the demo (examples/app.py) started in a subprocess on a free localhost port, the
demo tests' prerequisites (skipped without them, or failing where CI requires them), and a headless-Chromium
session that drives the page — also a script that saves the README's screenshots of a running demo:

    python tests/app_helpers.py --url http://127.0.0.1:7860 --query "a red circle" --image scene.png \\
        --question "What colour is the circle?" --output_dir docs
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest

APP = Path(__file__).parents[1] / "examples" / "app.py"
# Set to 1 where the demo's extras are installed (CI's demo step): a missing prerequisite fails instead of skipping.
REQUIRE_ENV = "COMA_REQUIRE_DEMO_TESTS"
CHROMIUM = "/usr/bin/chromium"  # Debian's `chromium` and `chromium-driver`: nothing downloaded
CHROMEDRIVER = "/usr/bin/chromedriver"
LOCAL_SCHEMES = ("data", "blob", "about", "chrome", "chrome-extension", "devtools")
LOCAL_HOSTS = ("127.0.0.1", "localhost")


def require(available: bool, reason: str) -> None:
    """Skip the calling test (or module) when a prerequisite is missing, or fail when `REQUIRE_ENV` is set."""
    if available:
        return
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1: the demo tests must run here)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_modules(*names: str) -> None:
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    require(not missing, f"needs {', '.join(missing)} (pip install -e '.[demo]' selenium)")


def require_browser() -> None:
    require_modules("selenium")
    present = Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()
    require(present, f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)")


# --------------------------------------------------------------------------------------------------------------------
# The app in a subprocess
# --------------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RunningApp:
    """`python examples/app.py *args` on a free port of 127.0.0.1, offline (no Hub), its output in `log`."""

    def __init__(self, args: list[str], cwd: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = log
        env = {key: value for key, value in os.environ.items() if not key.startswith("HF_")}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
        env.pop("GRADIO_ANALYTICS_ENABLED", None)  # the app turns analytics off itself
        with open(log, "wb") as output:
            self.process = subprocess.Popen(
                [sys.executable, str(APP), *args, "--port", str(self.port)],
                cwd=cwd,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
            )

    def wait(self, timeout: float = 300) -> RunningApp:
        """Block until the page answers; the app's log on failure."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the app exited ({self.process.returncode}):\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url, timeout=5) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        raise TimeoutError(f"the app did not answer within {timeout} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# --------------------------------------------------------------------------------------------------------------------
# The page in headless Chromium
# --------------------------------------------------------------------------------------------------------------------
def chromium(width: int = 1280, height: int = 1100):
    """A headless Chromium driven through Debian's chromedriver, recording every network request."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager never downloads a browser or driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def requested_urls(driver) -> list[str]:
    """Every URL the page has requested since the last call (Chrome's performance log)."""
    import json

    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] in ("Network.requestWillBeSent", "Network.webSocketCreated"):
            params = message["params"]
            urls.append(params["request"]["url"] if "request" in params else params["url"])
    return urls


def outside_requests(urls: list[str]) -> list[str]:
    """The URLs that left this machine (anything but 127.0.0.1 / localhost and in-page schemes)."""
    return [
        url for url in urls if urlparse(url).scheme not in LOCAL_SCHEMES and urlparse(url).hostname not in LOCAL_HOSTS
    ]


def _wait(driver, condition, timeout: float = 180):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.25).until(condition)


def search_in_page(driver, url: str, query: str) -> list[str]:
    """Load the page, type `query` in the Search tab, press Search and wait for the gallery; its image sources."""
    from selenium.webdriver.common.by import By

    driver.get(url)
    _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#query textarea")).send_keys(query)
    driver.find_element(By.CSS_SELECTOR, "#search_button").click()
    images = _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#results img") or False)
    _wait(driver, lambda d: all(image.get_property("complete") for image in images))
    return [image.get_attribute("src") for image in images]


def ask_in_page(driver, image: Path, question: str) -> tuple[str, str]:
    """Open the ask tab, upload `image`, ask `question`; the two answers as the page shows them."""
    from selenium.webdriver.common.by import By

    tabs = driver.find_elements(By.CSS_SELECTOR, "button[role='tab']")
    next(tab for tab in tabs if tab.text.strip() == "Ask the compression").click()
    upload = _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#upload input[type=file]"))
    upload.send_keys(str(image.resolve()))
    _wait(driver, lambda d: "K = " in d.find_element(By.CSS_SELECTOR, "#tokens").text)
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#preview img") or False)
    driver.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(question)
    driver.find_element(By.CSS_SELECTOR, "#ask_button").click()
    answers = [f"#{name} textarea" for name in ("from_states", "visible")]
    _wait(driver, lambda d: all(d.find_element(By.CSS_SELECTOR, css).get_property("value") for css in answers))
    return tuple(driver.find_element(By.CSS_SELECTOR, css).get_property("value") for css in answers)


def save_screenshots(url: str, query: str, image: Path, question: str, output_dir: Path) -> dict:
    """Drive both tabs of the demo at `url`, saving `demo_search.png` and `demo_ask.png` in `output_dir`; returns
    what the page showed and every request it made."""
    output_dir.mkdir(parents=True, exist_ok=True)
    driver = chromium()
    try:
        gallery = search_in_page(driver, url, query)
        driver.save_screenshot(str(output_dir / "demo_search.png"))
        answers = ask_in_page(driver, image, question)
        driver.save_screenshot(str(output_dir / "demo_ask.png"))
        urls = requested_urls(driver)
    finally:
        driver.quit()
    return {"gallery": gallery, "answers": answers, "urls": urls}


def main() -> None:
    parser = argparse.ArgumentParser(description="Save screenshots of both tabs of a running demo.")
    parser.add_argument("--url", default="http://127.0.0.1:7860/")
    parser.add_argument("--query", default="a red circle")
    parser.add_argument("--image", type=Path, required=True, help="The image to upload in the ask tab.")
    parser.add_argument("--question", default="What colour is the circle?")
    parser.add_argument("--output_dir", type=Path, default=Path("docs"))
    args = parser.parse_args()
    seen = save_screenshots(args.url, args.query, args.image, args.question, args.output_dir)
    print(f"gallery of {len(seen['gallery'])} images; answers {seen['answers']}")
    print(f"requests that left the machine: {outside_requests(seen['urls'])}")


if __name__ == "__main__":
    main()
