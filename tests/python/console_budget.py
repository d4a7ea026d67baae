"""Every console page, opened in a real browser (headless Chromium through Selenium) on a
gateway with many keys and tenants, fetches what the page shows and no more: the server
searches, pages and aggregates. For each page this counts the admin API requests it made and
the bytes they brought, and checks them against a budget that does not grow with the keys.
Prints each page's figures (requests, bytes, milliseconds until shown; the time is reported,
never checked).

Needs SLUICE_ADMIN_URL, SLUICE_ADMIN_TOKEN and SLUICE_KEYS (how many keys there are)."""

import os
import sys
import time

import chromium
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec

ADMIN = os.environ["SLUICE_ADMIN_URL"]
TOKEN = os.environ["SLUICE_ADMIN_TOKEN"]
KEYS = int(os.environ["SLUICE_KEYS"])
# A page may make this many admin API requests, bringing at most this many bytes, however
# many keys, tenants and usage events there are.
MAX_REQUESTS = 3
MAX_BYTES = 256 << 10

# The console re-renders tables after each change: a row read mid-render is simply read again.
driver, wait = chromium.start(60)


def check(condition, message):
    if not condition:
        print("FAILED:", message)
        driver.quit()
        sys.exit(1)


def css(selector):
    return driver.find_element(By.CSS_SELECTOR, selector)


def api_requests():
    """The admin API requests made since the last clear: (path, bytes of body)."""
    entries = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => [e.name, e.encodedBodySize]);")
    return [(name.replace(ADMIN, ""), size) for name, size in entries if "/admin/v1/" in name]


# What shows that each page has what it loaded.
SHOWN = {
    "traffic": lambda d: d.find_elements(By.CSS_SELECTOR, "#traffic-now .stat"),
    "keys": lambda d: f"of {KEYS:,} keys" in css("#keys-count").text,
    "tenants": lambda d: len(d.find_elements(By.CSS_SELECTOR, "#tenants tbody tr")) >= 100,
    "tiers": lambda d: d.find_elements(By.CSS_SELECTOR, "#tiers tbody tr"),
    "money": lambda d: "fullest of" in css("#budgets-more").text,
    "usage": lambda d: d.find_elements(By.CSS_SELECTOR, "#usage-table tbody tr"),
    "cache": lambda d: "entries" in css("#cache-summary").text,
    "backends": lambda d: d.find_elements(By.CSS_SELECTOR, "#backends tbody tr"),
    "alerts": lambda d: "Spend alerts" in css("#alerts-state").text,
    "audit": lambda d: len(d.find_elements(By.CSS_SELECTOR, "#audit tbody tr")) == 100,
}

try:
    driver.set_window_size(1280, 1000)
    driver.get(ADMIN + "/console")
    css("#token").send_keys(TOKEN)
    driver.execute_script("performance.clearResourceTimings(); performance.setResourceTimingBufferSize(10000);")
    css("#signin-button").click()
    wait.until(ec.visibility_of_element_located((By.ID, "app")))
    for page, shown in SHOWN.items():
        if page != "traffic":
            driver.execute_script("performance.clearResourceTimings();")
            started = time.monotonic()
            css(f'header button[data-tab="{page}"]').click()
        else:
            started = time.monotonic()
        wait.until(shown)
        took = (time.monotonic() - started) * 1000
        requests = api_requests()
        # Sign-in reads the tiers once before the first page.
        if page == "traffic":
            requests = [r for r in requests if not r[0].startswith("/admin/v1/tiers")]
        size = sum(b for _, b in requests)
        print(f"{page:9} {len(requests)} request(s) {size:>8} bytes {took:7.0f} ms  {[p for p, _ in requests]}")
        check(css("#error").text == "", f"{page}: no error shown ({css('#error').text})")
        check(1 <= len(requests) <= MAX_REQUESTS, f"{page}: {len(requests)} requests: {requests}")
        check(size <= MAX_BYTES, f"{page}: {size} bytes")
        if page == "keys":
            check(len(driver.find_elements(By.CSS_SELECTOR, "#keys tbody tr")) == 50, "a page of keys")
        if page == "money":
            check(len(driver.find_elements(By.CSS_SELECTOR, "#budgets tbody tr")) == 50, "the 50 fullest budgets")
            check(f"of {KEYS:,} budgets" in css("#budgets-more").text,
                  "every key's budget is counted: " + css("#budgets-more").text)
    # Search among all of them is the server's: one request, one key back.
    driver.execute_script("performance.clearResourceTimings();")
    css('header button[data-tab="keys"]').click()
    wait.until(lambda d: api_requests())
    driver.execute_script("performance.clearResourceTimings();")
    css("#key-search").send_keys("bulk-7777")
    wait.until(lambda d: css("#keys-count").text == "1–1 of 1 keys")
    requests = api_requests()
    print(f"search    {len(requests)} request(s) {sum(b for _, b in requests):>8} bytes")
    check(len(requests) <= 2 and sum(b for _, b in requests) < 16 << 10, f"search: {requests}")
    print("ALL OK")
finally:
    driver.quit()
