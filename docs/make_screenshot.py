"""Make docs/settings-page.png: the settings page of a real gateway, as its user sees it.

Run from the repository with .venv active: ``python docs/make_screenshot.py``. It starts
the fake upstream and a two-worker gateway in a temporary folder, stores a key through
the page, holds two streams open and shoots the page in Debian's Chromium (then shrinks
it with pngquant when that is installed).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from playwright.sync_api import expect, sync_playwright  # noqa: E402

from loadtests.fake_upstream import FakeUpstream  # noqa: E402
from tests.fixtures.gateway import held_streams, module_gateway  # noqa: E402
from tests.gateway.web.browsing import CHROMIUM, CHROMIUM_ARGS, SettingsPage, open_page  # noqa: E402

OUT = ROOT / "docs" / "settings-page.png"


def main() -> None:
    with (
        FakeUpstream.start() as upstream,
        tempfile.TemporaryDirectory() as tmp,
        module_gateway(Path(tmp), upstream.url) as gateway,
        sync_playwright() as driver,
    ):
        token = gateway.create_user("alice")
        browser = driver.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page, log = open_page(browser, viewport={"width": 720, "height": 600})
        settings = SettingsPage(page, log, gateway, Path(tmp))
        settings.open()
        settings.sign_in(token)
        settings.key.fill("sk-ant-api03-example")
        settings.save.click()
        expect(settings.message).to_have_text("Saved: key stored.")
        with held_streams(gateway, token, 2):
            page.get_by_role("button", name="Refresh").click()
            expect(settings.status).to_contain_text("2 in use now")
            page.screenshot(path=OUT, full_page=True)
        browser.close()
    if shutil.which("pngquant"):  # a third of the size (apt-get install pngquant)
        subprocess.run(["pngquant", "--quality=70-90", "--force", "--output", OUT, OUT], check=True)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
