"""End to end in a real browser: Debian's chromium driven by Playwright.

The app runs in this process (``demo.launch(prevent_thread_lock=True)``) on a free port with a
temporary style library.  The test trains one style from an example button and one from uploaded
files, picks the new style in the Generate tab, generates, and downloads the exported library.
It also screenshots the three tabs; with ``SHARE_UPDATE_SCREENSHOTS=1`` they are written to
``docs/screenshots/`` (generate.png, train.png, library.png), else only to the test's temp folder.
"""

import json
import os
import shutil
import socket
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("browser test needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="browser test needs playwright (pip install playwright)")
gr = pytest.importorskip("gradio")

from app.ui import build_app  # noqa: E402
from share_diffusion.library import StyleLibrary  # noqa: E402
from share_diffusion.loading import EMBEDDED_MODEL_DIR, load_pipeline  # noqa: E402
from share_diffusion.png_metadata import read_png_metadata  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "styles" / "examples"
SCREENSHOTS = ROOT / "docs" / "screenshots"
MODEL = os.environ.get("SHARE_TEST_MODEL", str(EMBEDDED_MODEL_DIR))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 90_000  # one CPU training or generation step with a busy machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser-app")
    pipe = load_pipeline(MODEL, device="cpu", progress=False)
    demo = build_app(pipe, library_path=folder / "library.safetensors", output_dir=folder / "outputs",
                     work_dir=folder / "work")
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=[str(demo.share_output_dir)])
    try:
        yield f"http://127.0.0.1:{port}/", demo
    finally:
        demo.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


def screenshot(page, tmp_path: Path, name: str) -> None:
    for _ in range(5):  # close the notifications, which would hide part of the page
        if not page.evaluate("() => { const b = [...document.querySelectorAll('.toast-close')]; b.forEach(e => e.click()); return b.length }"):
            break
        page.wait_for_timeout(300)
    page.wait_for_timeout(500)  # let galleries settle
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000
    if os.environ.get("SHARE_UPDATE_SCREENSHOTS") == "1":
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, SCREENSHOTS / name)


def set_advanced_training(page, steps: int, batch_size: int = 2, preview_every: int = 2) -> None:
    advanced = page.locator("#train-advanced")
    if not page.locator("#train-steps input").is_visible():
        advanced.get_by_text("Advanced").click()
    fields = {"#train-steps input": str(steps), "#train-batch-size input": str(batch_size),
              "#train-preview-every input": str(preview_every)}
    # Right after an example set loads, Gradio's page can still put a stale value back into a field
    # filled within the same few milliseconds (seen only in a fresh process, never at human speed):
    # fill again until all three fields hold their values for a moment.
    for _ in range(5):
        for selector, value in fields.items():
            if page.input_value(selector) != value:
                page.fill(selector, value)
        page.wait_for_timeout(300)
        if all(page.input_value(selector) == value for selector, value in fields.items()):
            return
    raise AssertionError(f"the advanced fields do not keep their values; events the page ran: {page.share_events}")


def log_events(page, demo) -> None:
    """Record, in ``page.share_events``, the name of each server function the page calls."""
    page.share_events = []

    def on_request(request):
        if "/queue/join" in request.url and request.post_data:
            fn_index = json.loads(request.post_data)["fn_index"]
            page.share_events.append(demo.fns[fn_index].name)

    page.on("request", on_request)


def wait_for_train_status(page, demo, text: str) -> None:
    """Wait for the training status to show ``text``; on a timeout, say what the page and server showed."""
    try:
        page.locator("#train-status", has_text=text).wait_for()
    except sync_api.TimeoutError:
        status = page.locator("#train-status").inner_text()
        toasts = page.locator(".toast-body").all_inner_texts()
        training = demo.share_callbacks._job is not None
        raise AssertionError(f"train status never showed {text!r}: it shows {status!r}; steps field "
                             f"{page.input_value('#train-steps input')!r}; training running on the server: "
                             f"{training}; styles on the server: {demo.share_studio.style_names()}; notifications: {toasts}; "
                             f"events the page ran: {page.share_events}") from None


def choose(page, label: str, option: str) -> None:
    page.get_by_role("combobox", name=label, exact=True).click()
    page.get_by_role("option", name=option, exact=True).click()


def test_train_generate_and_export_in_the_browser(app_url, browser, tmp_path):
    url, demo = app_url
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page.set_default_timeout(TIMEOUT_MS)
    log_events(page, demo)
    page.goto(url)
    page.get_by_text("Share Studio").first.wait_for()

    # Train tab: a one-click example set...
    page.get_by_role("tab", name="Train").click()
    page.click("#example-hatching")
    page.locator("#upload-summary", has_text="12 usable images (12 with captions)").wait_for()
    assert page.locator("#style-name").get_by_role("textbox").input_value() == "Hatching"
    set_advanced_training(page, steps=4)
    page.click("#train-button")
    wait_for_train_status(page, demo, "Learned Hatching (4 steps)")

    # ...then files uploaded by hand (what drag and drop delivers), one of them not an image.
    neon = sorted(EXAMPLES.glob("neon/*.png"))[:4]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    page.locator("#train-files").get_by_role("button", name="Clear", exact=True).click()
    page.locator("#upload-summary", has_text="No images yet").wait_for()
    page.set_input_files("#train-files input[type=file]",
                         [str(p) for image in neon for p in (image, image.with_suffix(".txt"))] + [str(broken)])
    page.locator("#upload-summary", has_text="4 usable images (4 with captions); 1 rejected").wait_for()
    page.locator("#rejected", has_text="broken.png").wait_for()
    page.locator("#style-name").get_by_role("textbox").fill("Neon Test")
    page.locator("#style-trigger").get_by_role("textbox").fill("neonglow")
    set_advanced_training(page, steps=4)
    page.click("#train-button")
    wait_for_train_status(page, demo, "Learned Neon Test (4 steps)")
    page.locator("#train-comparison", has_text="Hatching · after").wait_for()
    page.locator("#train-errors", has_text="Hatching").wait_for()
    assert page.locator("#train-previews img").count() >= 3  # steps 2 and 4, and the final sample
    screenshot(page, tmp_path, "train.png")

    # Generate tab: the new style is in the dropdown; generate with it.
    page.get_by_role("tab", name="Generate").click()
    choose(page, "Style", "Neon Test")
    page.locator("#prompt").get_by_role("textbox").fill("a red circle on a blue background")
    page.fill("#generate-steps input[type=number]", "6")
    page.click("#generate-button")
    page.locator("#generate-note", has_text="neonglow style").wait_for()
    page.locator("#generate-gallery img").first.wait_for()
    used_seed = int(page.input_value("#used-seed input"))
    pngs = sorted(demo.share_output_dir.glob("*.png"))
    meta = read_png_metadata(pngs[-1])
    assert meta["styles"] == {"Neon Test": 1.0} and meta["seed"] == used_seed
    assert meta["library_hash"] == demo.share_studio.library_hash()
    with page.expect_download() as download:
        page.locator("#generate-downloads a[download]").first.click()
    saved_png = tmp_path / download.value.suggested_filename
    download.value.save_as(saved_png)
    assert read_png_metadata(saved_png)["styles"] == {"Neon Test": 1.0}  # metadata survives the download
    screenshot(page, tmp_path, "generate.png")

    # A long training: generating still works meanwhile, and Cancel leaves the library as it was.
    page.get_by_role("tab", name="Train").click()
    page.click("#example-mosaic")
    page.locator("#upload-summary", has_text="12 usable images").wait_for()
    set_advanced_training(page, steps=5000, preview_every=0)
    page.click("#train-button")
    wait_for_train_status(page, demo, "Training Mosaic: step")
    page.get_by_role("tab", name="Generate").click()
    note = page.locator("#generate-note")
    before = note.inner_text()
    page.click("#random-seed")
    page.click("#generate-button")
    sync_api.expect(note).not_to_have_text(before, timeout=TIMEOUT_MS)
    assert "neonglow style" in note.inner_text()
    assert demo.share_callbacks._job is not None  # the training is still running
    page.get_by_role("tab", name="Train").click()
    page.click("#cancel-button")
    wait_for_train_status(page, demo, "Cancelled")
    assert demo.share_studio.style_names() == ["Hatching", "Neon Test"]

    # Library tab: both styles listed; export the library file and load the download.
    page.get_by_role("tab", name="Library").click()
    table = page.locator("#library-table")
    table.get_by_text("Neon Test").filter(visible=True).first.wait_for()
    table.get_by_text("neonglow").filter(visible=True).first.wait_for()
    table.locator("img").filter(visible=True).nth(1).wait_for()  # both samples are rendered
    page.click("#export-library")
    link = page.locator("#library-download a[download]")
    link.wait_for()
    with page.expect_download() as download:
        link.click()
    exported = tmp_path / "exported.safetensors"
    download.value.save_as(exported)
    library = StyleLibrary.load(exported)
    assert [s["name"] for s in library.styles] == ["Hatching", "Neon Test"]
    assert library.styles[1]["trigger"] == "neonglow"
    screenshot(page, tmp_path, "library.png")
    page.close()
