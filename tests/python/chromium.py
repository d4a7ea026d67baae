"""Headless Chromium driven through Selenium, as the console tests use it: Debian's chromium
and chromedriver (or CHROMIUM and CHROMEDRIVER), and a wait that reads again an element the
console re-rendered under it."""

import os

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.support.ui import WebDriverWait


def start(wait_seconds):
    """A driver, and a wait of `wait_seconds` on it."""
    options = webdriver.ChromeOptions()
    options.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    service = Service(executable_path=os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
    driver = webdriver.Chrome(service=service, options=options)
    return driver, WebDriverWait(driver, wait_seconds, ignored_exceptions=(StaleElementReferenceException,))
