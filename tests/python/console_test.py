"""The admin console in a real browser (headless Chromium through Selenium), every page: live
traffic charts; find one key among thousands by search and page through them; create a key
with its allowed models and change them, change its tier, watch its live quota, revoke it; set
a tenant's limits and read its live quota; edit a tier; the month's budgets and top spenders,
and a billing export; usage charts (axis labels, legend colours equal to the bars'); cache
stats and a purge; drain, undrain, add and remove a backend; spend alerts; and the audit trail
with this test's own changes by the right actor. A screenshot of each page is saved.

Needs SLUICE_ADMIN_URL, SLUICE_ADMIN_TOKEN, SLUICE_TENANT (a tenant with traffic),
SLUICE_NEEDLE (the name of one key among many), SLUICE_KEYS (how many keys there are),
SLUICE_BACKEND_URL (a backend to add) and SLUICE_SCREENSHOTS (a directory)."""

import json
import os
import sys
import urllib.request

import chromium
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait

ADMIN = os.environ["SLUICE_ADMIN_URL"]
TOKEN = os.environ["SLUICE_ADMIN_TOKEN"]
TENANT = os.environ["SLUICE_TENANT"]
NEEDLE = os.environ["SLUICE_NEEDLE"]
KEYS = int(os.environ["SLUICE_KEYS"])
BACKEND_URL = os.environ["SLUICE_BACKEND_URL"]
# Where each page is saved as a PNG (test artefacts).
SCREENSHOTS = os.environ["SLUICE_SCREENSHOTS"]

# The console re-renders tables after each change: a row read mid-render is simply read again.
driver, wait = chromium.start(30)


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
    wait.until(lambda d: css(f"#tab-{name}").is_displayed())


def screenshot(page):
    check(driver.save_screenshot(os.path.join(SCREENSHOTS, f"console-{page}.png")), "screenshot of " + page)


def accept_confirmation():
    """Every change that cannot be taken back asks first."""
    wait.until(ec.alert_is_present()).accept()


def click_key_control(key_id, control):
    """Clicks a control in a key's row. Every change reloads the table from the API, so the
    row found a moment ago may have been replaced by the time of the click: find it afresh
    until the click lands."""
    def clicked(d):
        d.find_element(By.CSS_SELECTOR, f'#keys tr[data-key="{key_id}"] {control}').click()
        return True
    WebDriverWait(driver, 30, ignored_exceptions=(StaleElementReferenceException,)).until(clicked)


def rgb(hex_colour):
    h = hex_colour.lstrip("#")
    return tuple(int(h[i:i + 2], 16) for i in (0, 2, 4))


def css_rgb(value):
    """'rgb(47, 111, 219)' or 'rgba(47, 111, 219, 1)' -> (47, 111, 219)."""
    inside = value[value.index("(") + 1:value.index(")")]
    return tuple(int(float(v)) for v in inside.split(",")[:3])


def check_chart(container, unit, x_title):
    """A chart has both axes' titles, tick labels on both, and a legend whose swatches are
    the colours of its own series."""
    chart = css(container)
    check(chart.find_element(By.CSS_SELECTOR, "text.y-title").text == unit, f"{container}: y axis titled {unit}")
    check(chart.find_element(By.CSS_SELECTOR, "text.x-title").text == x_title, f"{container}: x axis titled {x_title}")
    check(len(chart.find_elements(By.CSS_SELECTOR, "text.y-label")) >= 2, f"{container}: y tick labels")
    check(len(chart.find_elements(By.CSS_SELECTOR, "text.x-label")) >= 1, f"{container}: x tick labels")
    items = chart.find_elements(By.CSS_SELECTOR, ".legend-item")
    check(len(items) >= 1, f"{container}: a legend")
    for item in items:
        series = item.get_attribute("data-series")
        marks = chart.find_elements(By.CSS_SELECTOR, f'[data-series="{series}"].bar, [data-series="{series}"].line')
        check(marks, f"{container}: series {series} is drawn")
        mark = marks[0]
        colour = mark.get_attribute("fill") if "bar" in mark.get_attribute("class") else mark.get_attribute("stroke")
        swatch = item.find_element(By.CSS_SELECTOR, ".swatch").value_of_css_property("background-color")
        check(css_rgb(swatch) == rgb(colour), f"{container}: legend of {series} is {swatch}, series drawn {colour}")
    # A value on hover: every bar and point carries a title.
    hover = chart.find_elements(By.CSS_SELECTOR, "rect.bar title, circle.point title")
    check(hover and all(unit in t.get_attribute("textContent") for t in hover), f"{container}: values on hover")


try:
    driver.set_window_size(1280, 1000)
    driver.get(ADMIN + "/console")
    # A wrong token is refused with a message.
    css("#token").send_keys("wrong-token-0123456789")
    css("#signin-button").click()
    wait.until(lambda d: "Sign-in failed" in css("#signin-error").text)
    css("#token").clear()
    css("#token").send_keys(TOKEN)
    css("#signin-button").click()
    wait.until(ec.visibility_of_element_located((By.ID, "app")))

    # Live traffic is the first page; the traffic sent before the test is charted (the page
    # refreshes itself every 5 seconds, and replicas add a bucket when it ends).
    check(css("#tab-traffic").is_displayed(), "the console opens on live traffic")
    WebDriverWait(driver, 30, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#chart-rps svg"))
    check_chart("#chart-rps", "requests/s", "time (UTC)")
    check_chart("#chart-latency", "ms", "time (UTC)")
    check_chart("#chart-tokens", "tokens/s", "time (UTC)")
    check("replica" in css("#traffic-scope").text, "the embedded store's traffic is this replica's")
    check("requests/s" in css("#traffic-now").text, "the last minute at a glance")
    screenshot("traffic")

    # Keys: one among thousands, found by the server's search; the rest a page at a time.
    tab("keys")
    wait.until(lambda d: f"of {KEYS:,} keys" in css("#keys-count").text)
    check(len(driver.find_elements(By.CSS_SELECTOR, "#keys tbody tr")) == 50, "a page of 50 keys")
    css("#keys-next").click()
    wait.until(lambda d: css("#keys-count").text.startswith("51–100 of"))
    css("#keys-prev").click()
    wait.until(lambda d: css("#keys-count").text.startswith("1–50 of"))
    css("#key-search").send_keys(NEEDLE.upper())
    wait.until(lambda d: css("#keys-count").text == "1–1 of 1 keys")
    rows = driver.find_elements(By.CSS_SELECTOR, "#keys tbody tr")
    check(len(rows) == 1 and NEEDLE in rows[0].text, "search finds the one key: " + rows[0].text)
    css("#key-search").clear()
    Select(css("#key-status")).select_by_visible_text("revoked")
    wait.until(lambda d: "No keys match." in css("#keys-count").text)
    Select(css("#key-status")).select_by_visible_text("active and revoked")
    wait.until(lambda d: f"of {KEYS:,} keys" in css("#keys-count").text)

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

    # Change its tier; the change is in the API afterwards. (The select shows the choice at
    # once; the table is reloaded only when the API has answered.)
    Select(row.find_element(By.CSS_SELECTOR, "select.tier")).select_by_visible_text("pro")
    wait.until(lambda d: admin("GET", f"/admin/v1/keys/{key_id}")["tier"] == "pro")
    WebDriverWait(driver, 30, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: Select(d.find_element(By.CSS_SELECTOR, f'#keys tr[data-key="{key_id}"] select.tier'))
        .first_selected_option.text == "pro")

    # Its live quota.
    click_key_control(key_id, ".show-quota")
    wait.until(lambda d: "requests_per_minute" in css("#quota-rows").text)
    check(key_id in css("#quota-key").text, "quota panel names the key")

    # Revoke it, once confirmed.
    click_key_control(key_id, ".revoke")
    accept_confirmation()
    wait.until(lambda d: "revoked" in d.find_element(By.CSS_SELECTOR, f'#keys tr[data-key="{key_id}"]').text)
    screenshot("keys")

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
    screenshot("tenants")
    # A bad value is refused with the API's message, and nothing changes.
    css("#tenant-distillation").clear()
    css("#tenant-rpm").clear()
    css("#tenant-rpm").send_keys("-5")
    css("#set-tenant button").click()
    wait.until(lambda d: "requests_per_minute" in css("#error").text)

    # Tiers: every tier's limits; edit one, and every field the form does not show is kept.
    tab("tiers")
    before = admin("GET", "/admin/v1/tiers/free")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#tiers tr[data-tier="free"]'))
    check("(default)" in css('#tiers tr[data-tier="free"]').text, "the default tier is marked")
    css('#tiers tr[data-tier="free"] .edit-tier').click()
    check(css("#tier-rpm").get_attribute("value") == str(before["limits"]["requests_per_minute"]),
          "the form starts from the tier's limits")
    # A typo is refused with the API's message naming the field, never taken for "unlimited".
    css("#tier-rpm").clear()
    css("#tier-rpm").send_keys("3x")
    css("#edit-tier button[type=submit]").click()
    wait.until(lambda d: "requests_per_minute" in css("#error").text)
    check(admin("GET", "/admin/v1/tiers/free") == before, "a refused edit changes nothing")
    css("#tier-rpm").clear()
    css("#tier-rpm").send_keys("33")
    css("#edit-tier button[type=submit]").click()
    wait.until(lambda d: "33" in css('#tiers tr[data-tier="free"]').text.split())
    after = admin("GET", "/admin/v1/tiers/free")
    check(after["limits"]["requests_per_minute"] == 33, "the tier's new limit is stored: " + json.dumps(after))
    check({k: v for k, v in after["limits"].items() if k != "requests_per_minute"}
          == {k: v for k, v in before["limits"].items() if k != "requests_per_minute"}
          and after["currency"] == before["currency"] and after["request_caps"] == before["request_caps"],
          "the tier's other settings are kept: " + json.dumps(after))
    screenshot("tiers")

    # Money: the traffic key's budget (its tier's) as a bar, the top spenders, an export.
    tab("money")
    wait.until(lambda d: TENANT in css("#top-tenants tbody").text)
    bars = driver.find_elements(By.CSS_SELECTOR, "#budgets tbody tr[data-budget]")
    check(bars, "every budget has a bar")
    check(all(b.get_attribute("data-level") in ("ok", "amber", "red") for b in bars), "bars are coloured by level")
    check(all(b.find_elements(By.CSS_SELECTOR, ".track .fill") for b in bars), "each bar has its fill")
    check("amber from 80%" in css("#budget-rule").text, "the colours follow the alert thresholds: " + css("#budget-rule").text)
    check(css("#money-unpriced").is_displayed(), "with no prices configured, the page says why every cost is 0")
    css("#export-grouped").click()
    wait.until(lambda d: "Saved sluice-billing-" in css("#downloaded").text)
    check(" 0 bytes" not in css("#downloaded").text, "the export is not empty: " + css("#downloaded").text)
    screenshot("money")

    # Usage: the tenant with traffic has bars in the chart and a row in the table; the chart
    # has axes with units and a legend in the bars' own colours.
    tab("usage")
    wait.until(lambda d: TENANT in css("#usage-table tbody").text)
    bars = driver.find_elements(By.CSS_SELECTOR, f'#usage-chart rect.bar[data-series="{TENANT}"]')
    check(len(bars) >= 1, "usage chart has a bar for the tenant")
    check_chart("#usage-chart", "tokens", "day (UTC)")
    labels = [t.text for t in driver.find_elements(By.CSS_SELECTOR, "#usage-chart text.x-label")]
    check(all(len(x) == 5 and x[2] == "-" for x in labels), "days along the bottom: " + repr(labels))
    Select(css("#usage-measure")).select_by_visible_text("requests")
    wait.until(lambda d: css("#usage-chart text.y-title").text == "requests")
    check_chart("#usage-chart", "requests", "day (UTC)")
    Select(css("#usage-group")).select_by_visible_text("model")
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#usage-chart rect.bar[data-series="sim-chat"]'))
    check_chart("#usage-chart", "requests", "day (UTC)")
    # No prices are configured: the cost chart says so instead of drawing zeros.
    Select(css("#usage-measure")).select_by_visible_text("cost")
    wait.until(lambda d: "no prices are configured" in css("#usage-chart").text)
    Select(css("#usage-measure")).select_by_visible_text("tokens")
    wait.until(lambda d: css("#usage-chart text.y-title").text == "tokens")
    screenshot("usage")

    # Cache: its counters, then a purge of the traffic tenant's entries, once confirmed.
    tab("cache")
    wait.until(lambda d: "entries" in css("#cache-summary").text)
    wait.until(lambda d: TENANT in css("#cache-tenants").text)
    entries = admin("GET", "/admin/v1/cache/stats")["by_tenant"][TENANT]["entries"]
    check(entries >= 1, "the tenant has cached answers")
    css("#purge-tenant").send_keys(TENANT)
    css("#purge-cache button").click()
    accept_confirmation()
    wait.until(lambda d: f"Purged {entries} entries" in css("#purge-result").text)
    screenshot("cache")

    # Backends: drain one and its health shows it, undrain it, add one and remove it.
    tab("backends")
    wait.until(lambda d: "up" in css("#backends tbody").text)
    check("sim-chat" in css("#backends tbody").text, "backends list their models")
    css('#backends tr[data-backend="backend-0"] .drain').click()
    accept_confirmation()
    wait.until(lambda d: css('#backends tr[data-backend="backend-0"] .health').text == "draining")
    check(admin("GET", "/admin/v1/backends")["data"][0]["draining"], "the drain is stored")
    css('#backends tr[data-backend="backend-0"] .undrain').click()
    wait.until(lambda d: css('#backends tr[data-backend="backend-0"] .health').text == "up")
    css("#backend-name").send_keys("browser-added")
    css("#backend-url").send_keys(BACKEND_URL)
    css("#backend-models").send_keys("sim-chat")
    css("#add-backend button").click()
    accept_confirmation()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#backends tr[data-backend="browser-added"]'))
    screenshot("backends")
    css('#backends tr[data-backend="browser-added"] .remove').click()
    accept_confirmation()
    wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, '#backends tr[data-backend="browser-added"]'))
    check(all(b["name"] != "browser-added" for b in admin("GET", "/admin/v1/backends")["data"]), "the removal is stored")

    tab("alerts")
    wait.until(lambda d: "Spend alerts" in css("#alerts-state").text)
    screenshot("alerts")

    # The audit trail lists this test's own changes, by the admin token that made them.
    tab("audit")
    wait.until(lambda d: "/admin/v1/tenants/" + TENANT in css("#audit tbody").text)
    audit = css("#audit tbody").text
    check("POST /admin/v1/keys" in audit and "admin-token:" in audit, "audit entries with their actor: " + audit[:300])
    check(("/admin/v1/keys/" + key_id) in audit, "the key's changes are audited")
    for action in ("PUT /admin/v1/tiers/free", "POST /admin/v1/backends/backend-0/drain",
                   "DELETE /admin/v1/backends/backend-0/drain", "DELETE /admin/v1/cache",
                   "POST /admin/v1/backends", "DELETE /admin/v1/backends/browser-added"):
        lines = [line for line in audit.splitlines() if action in line]
        check(lines and all("admin-token:" in line for line in lines), f"{action} is audited with its actor")
    # Each change says what it changed: the tenant's opt-in above, field by field.
    check("distillation: null → {\"models\":[\"sim-*\"]}" in audit, "before → after shown: " + audit[:600])
    screenshot("audit")
    print("ALL OK")
finally:
    driver.quit()
