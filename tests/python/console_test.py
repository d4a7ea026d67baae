"""The admin console in a real browser (headless Chromium through Selenium): sign in, create a
key with its allowed models and change them, change its tier, watch its live quota, revoke it,
set a tenant's limits and read its live quota, read usage charts, cache stats, backends and
spend alerts, and find its own changes in the audit trail. Needs SLUICE_ADMIN_URL, SLUICE_ADMIN_TOKEN and SLUICE_TENANT (a tenant with traffic)."""

import json
import os
import sys
import urllib.request

from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait

ADMIN = os.environ["SLUICE_ADMIN_URL"]
# Where the keys page is saved as a PNG once the key is revoked (a test artefact).
TOKEN = os.environ["SLUICE_ADMIN_TOKEN"]
TENANT = os.environ["SLUICE_TENANT"]

options = webdriver.ChromeOptions()
options.binary_location = os.environ.get("CHROMIUM", "/usr/bin/chromium")
for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
    options.add_argument(flag)
service = Service(executable_path=os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver"))
driver = webdriver.Chrome(service=service, options=options)
# The console re-renders tables after each change: a row read mid-render is simply read again.
wait = WebDriverWait(driver, 15, ignored_exceptions=(StaleElementReferenceException,))


def check(condition, message):
    if not condition:
        print("FAILED:", message)
        print(driver.page_source[:4000])
        driver.quit()
        sys.exit(1)


def admin(method, path):
    """The admin API's JSON answer, read beside the browser to check what the console stored."""
    request = urllib.request.Request(ADMIN + path, method=method, headers={"Authorization": "Bearer " + TOKEN})
    with urllib.request.urlopen(request) as response:
        return json.load(response)


def css(selector):
    return driver.find_element(By.CSS_SELECTOR, selector)


def tab(name):
    css(f'header button[data-tab="{name}"]').click()


try:
    driver.get(ADMIN + "/console")
    # A wrong token is refused with a message.
    css("#token").send_keys("wrong-token-0123456789")
    css("#signin-button").click()
    wait.until(lambda d: "Sign-in failed" in css("#signin-error").text)
    css("#token").clear()
    css("#token").send_keys(TOKEN)
    css("#signin-button").click()
    wait.until(ec.visibility_of_element_located((By.ID, "app")))

    # Create a key through the form; its secret is shown once and it appears in the table.
    css("#new-name").send_keys("from-the-browser")
    css("#new-tenant").send_keys("browser-tenant")
    # The form offers the default tier first.
    default_tier = admin("GET", "/admin/v1/tiers")["default_tier"]
    check(Select(css("#new-tier")).first_selected_option.text == default_tier,
          "the new-key form starts on the default tier " + default_tier)
    css("#new-models").send_keys("sim-chat, sim-embed")
    css("#create-key button").click()
    wait.until(lambda d: "sk-sluice-" in css("#new-secret").text)
    row = wait.until(lambda d: next((r for r in d.find_elements(By.CSS_SELECTOR, "#keys tbody tr")
                                     if "from-the-browser" in r.text), None))
    key_id = row.get_attribute("data-key")
    check("sim-chat, sim-embed" in row.text, "the key's allowed models are shown")

    # Change its models through the prompt; the row shows the new list.
    row.find_element(By.CSS_SELECTOR, ".edit-models").click()
    prompt = wait.until(ec.alert_is_present())
    prompt.send_keys("sim-*")
    prompt.accept()
    wait.until(lambda d: "sim-*" in d.find_element(By.CSS_SELECTOR, f'#keys tr[data-key="{key_id}"]').text)
    row = driver.find_element(By.CSS_SELECTOR, f'#keys tr[data-key="{key_id}"]')  # re-rendered

    # Change its tier; the change is in the API afterwards.
    Select(row.find_element(By.CSS_SELECTOR, "select.tier")).select_by_visible_text("pro")
    wait.until(lambda d: Select(d.find_element(By.CSS_SELECTOR, f'#keys tr[data-key="{key_id}"] select.tier'))
               .first_selected_option.text == "pro")

    # Its live quota.
    driver.find_element(By.CSS_SELECTOR, f'#keys tr[data-key="{key_id}"] .show-quota').click()
    wait.until(lambda d: "requests_per_minute" in css("#quota-rows").text)
    check(key_id in css("#quota-key").text, "quota panel names the key")

    # Revoke it.
    driver.find_element(By.CSS_SELECTOR, f'#keys tr[data-key="{key_id}"] .revoke').click()
    wait.until(lambda d: "revoked" in d.find_element(By.CSS_SELECTOR, f'#keys tr[data-key="{key_id}"]').text)
    driver.set_window_size(1280, 900)
    check(driver.save_screenshot(os.environ["SLUICE_SCREENSHOT"]), "screenshot saved")

    # Tenants: set the traffic tenant's limits through the form; the row and its live quota
    # show them.
    tab("tenants")
    css("#tenant-id").send_keys(TENANT)
    css("#tenant-rpm").send_keys("1000")
    css("#tenant-budget").send_keys("500")
    css("#set-tenant button").click()
    tenant_row = wait.until(lambda d: next((r for r in d.find_elements(By.CSS_SELECTOR, "#tenants tbody tr")
                                            if r.get_attribute("data-tenant") == TENANT), None))
    check("1000" in tenant_row.text and "500" in tenant_row.text, "the tenant's limits are listed: " + tenant_row.text)
    check("off" in tenant_row.text, "distillation capture is shown off by default: " + tenant_row.text)
    tenant_row.find_element(By.CSS_SELECTOR, ".show-tenant-quota").click()
    wait.until(lambda d: "requests_per_minute" in css("#tenant-quota-rows").text)
    rpm_row = next(r for r in driver.find_elements(By.CSS_SELECTOR, "#tenant-quota-rows tr")
                   if r.text.startswith("requests_per_minute"))
    used, remaining, limit = (int(v) for v in rpm_row.text.split()[1:4])
    check(limit == 1000 and used + remaining == 1000, "the tenant's minute against its limit: " + rpm_row.text)
    # Opting the tenant in to capture for distillation names the models in its row, and the
    # limits set before are kept.
    css("#tenant-distillation").send_keys("sim-*")
    css("#set-tenant button").click()
    wait.until(lambda d: "captures sim-*" in next(r for r in d.find_elements(By.CSS_SELECTOR, "#tenants tbody tr")
                                                   if r.get_attribute("data-tenant") == TENANT).text)
    tenant = admin("GET", "/admin/v1/tenants/" + TENANT)
    check(tenant["distillation"] == {"models": ["sim-*"]} and tenant["limits"]["requests_per_minute"] == 1000,
          "the opt-in is stored beside the limits: " + json.dumps(tenant))
    # A bad value is refused with the API's message, and nothing changes.
    css("#tenant-distillation").clear()
    css("#tenant-rpm").clear()
    css("#tenant-rpm").send_keys("-5")
    css("#set-tenant button").click()
    wait.until(lambda d: "requests_per_minute" in css("#error").text)

    # Usage: the tenant with traffic has bars in the chart and a row in the table.
    tab("usage")
    wait.until(lambda d: TENANT in css("#usage-table tbody").text)
    bars = driver.find_elements(By.CSS_SELECTOR, f'#usage-chart rect.bar[data-series="{TENANT}"]')
    check(len(bars) >= 1, "usage chart has a bar for the tenant")
    Select(css("#usage-measure")).select_by_visible_text("requests")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f'#usage-chart rect.bar[data-series="{TENANT}"]'))
    Select(css("#usage-group")).select_by_visible_text("model")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#usage-chart rect.bar[data-series="sim-chat"]'))

    # Cache and backends.
    tab("cache")
    wait.until(lambda d: "entries" in css("#cache-summary").text)
    wait.until(lambda d: TENANT in css("#cache-tenants").text)
    tab("backends")
    wait.until(lambda d: "up" in css("#backends tbody").text)
    check("sim-chat" in css("#backends tbody").text, "backends list their models")
    tab("alerts")
    wait.until(lambda d: "Spend alerts" in css("#alerts-state").text)
    # The audit trail lists this test's own changes, by the admin token that made them.
    tab("audit")
    wait.until(lambda d: "/admin/v1/tenants/" + TENANT in css("#audit tbody").text)
    audit = css("#audit tbody").text
    check("POST /admin/v1/keys" in audit and "admin-token:" in audit, "audit entries with their actor: " + audit[:300])
    check(("/admin/v1/keys/" + key_id) in audit, "the key's changes are audited")
    # Each change says what it changed: the tenant's opt-in above, field by field.
    check("distillation: null → {\"models\":[\"sim-*\"]}" in audit, "before → after shown: " + audit[:600])
    print("ALL OK")
finally:
    driver.quit()
