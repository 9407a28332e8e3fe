"""The web page in a real browser (Debian Chromium through Playwright) against a real server.

Everything the user does goes through the page; httpx only reads the server's state to check
that the page and the server agree. The page may not reach any host but the server.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from urllib.parse import urlparse

import av
import httpx
import pytest
from media import make_video
from servers import Server

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium")

BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--no-first-run", "--disable-sync"]
VIEWPORT = {"width": 1366, "height": 768}  # a laptop: a 1080p video must fit with the page
KEY = "web-key-0123456789abcdef"
W, H, FRAMES = 320, 240, 12
BOX_CENTRE = (85, 120)  # the moving box of synthetic_video on frame 0


# ----------------------------------------------------------------------------- fixtures
def server_env(root: Path, checkpoint: Path, **extra: str) -> dict[str, str]:
    return {"SAM2_CHECKPOINT": str(checkpoint), "SAM2_IMAGE_SIZE": "256", "SAM2_DEVICE": "cpu",
            "SAM2_UPLOAD_DIR": str(root / "uploads"), "SAM2_OUTPUT_DIR": str(root / "outputs"),
            **extra}


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint):
    root = tmp_path_factory.mktemp("web")
    srv = Server(server_env(root, checkpoint), root / "server.log").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return make_video(tmp_path_factory.mktemp("media") / "clip.mp4", num_frames=FRAMES,
                      width=W, height=H)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        yield b
        b.close()


@pytest.fixture
def shots(tmp_path) -> Path:
    folder = Path(os.environ.get("SAM2_SCREENSHOTS") or tmp_path / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class PageLog:
    """Console errors, uncaught exceptions and requests to other hosts, seen by the page."""

    def __init__(self):
        self.errors: list[str] = []
        self.outside: list[str] = []
        self.allowed = re.compile(r"$^")  # console errors a test expects (none by default)

    def check(self) -> None:
        errors = [e for e in self.errors if not self.allowed.search(e)]
        assert not errors, errors
        assert not self.outside, f"the page tried to reach other hosts: {self.outside}"


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=VIEWPORT, accept_downloads=True)
    pg = context.new_page()
    log = PageLog()

    def route(r):
        if urlparse(r.request.url).hostname == "127.0.0.1":
            r.continue_()
        else:
            log.outside.append(r.request.url)
            r.abort()

    pg.route("**/*", route)
    pg.on("console", lambda m: m.type == "error" and log.errors.append(
        f"{m.text} ({m.location.get('url')})"))
    pg.on("pageerror", lambda e: log.errors.append(f"uncaught: {e}"))
    pg.log = log
    yield pg
    context.close()
    log.check()


# ----------------------------------------------------------------------------- helpers
def wait(page, js: str, arg=None, timeout: float = 60_000):
    page.wait_for_function(js, arg=arg, timeout=timeout)


def stage(page) -> dict:
    return page.eval_on_selector("#stage", "e => ({...e.dataset})")


def session_id(page) -> str:
    return re.search(r"session=([0-9a-f-]+)", page.url).group(1)


def state(server: Server, sid: str, key: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.get(f"{server.url}/session/{sid}", headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def prompts_of(desc: dict) -> dict:
    """current_prompts without the `mask` flag: the shape the page keeps on <body data-prompts>."""
    return {obj: {f: {k: v for k, v in rec.items() if k != "mask"} for f, rec in frames.items()}
            for obj, frames in desc["current_prompts"].items()}


def page_prompts(page) -> dict:
    return json.loads(page.eval_on_selector("body", "b => b.dataset.prompts || '{}'"))


def settled(page) -> None:
    """Every prompt request the page sent has been answered, and the page logged no error."""
    wait(page, "() => (document.body.dataset.pending || '0') === '0'")
    page.log.check()


def to_screen(page, x: float, y: float) -> tuple[float, float]:
    """Video pixel -> position on the frame canvas."""
    box = page.locator("#marks-canvas").bounding_box()
    return box["x"] + (x + 0.5) * box["width"] / W, box["y"] + (y + 0.5) * box["height"] / H


def click_video(page, x: float, y: float, button: str = "left", alt: bool = False) -> None:
    sx, sy = to_screen(page, x, y)
    if alt:
        page.keyboard.down("Alt")
    page.mouse.click(sx, sy, button=button)
    if alt:
        page.keyboard.up("Alt")


def drag_video(page, a: tuple[int, int], b: tuple[int, int]) -> None:
    page.mouse.move(*to_screen(page, *a))
    page.mouse.down()
    page.mouse.move(*to_screen(page, (a[0] + b[0]) / 2, (a[1] + b[1]) / 2), steps=3)
    page.mouse.move(*to_screen(page, *b), steps=3)
    page.mouse.up()


MASK_PIXELS = """([r, g, b]) => {
  const c = document.getElementById('mask-canvas');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let any = 0, match = 0;
  for (let q = 0; q < d.length; q += 4) {
    if (!d[q + 3]) continue;
    any++;
    // Half-transparent pixels come back un-premultiplied: allow rounding.
    if (Math.abs(d[q] - r) < 4 && Math.abs(d[q + 1] - g) < 4 && Math.abs(d[q + 2] - b) < 4) match++;
  }
  return {any, match};
}"""

MARK_DOTS = """() => {
  const c = document.getElementById('marks-canvas');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let green = 0, red = 0;
  for (let q = 0; q < d.length; q += 4) {
    if (d[q + 3] < 200) continue;
    if (d[q] < 80 && d[q + 1] > 150 && d[q + 2] < 130) green++;
    if (d[q] > 200 && d[q + 1] < 100 && d[q + 2] < 100) red++;
  }
  return {green, red};
}"""


def mask_pixels(page, color: str) -> dict:
    """Pixels of the mask canvas: coloured at all, and exactly in `color` (fill or outline)."""
    rgb = [int(color[i:i + 2], 16) for i in (1, 3, 5)]
    return page.evaluate(MASK_PIXELS, rgb)


def propagate(page, button: str = "#prop-forward", key: str | None = None) -> None:
    """Start a propagation (a click, or `key` on the focused button); wait until the job ended
    and the page has read the session again."""
    before = page.eval_on_selector("#prop-status", "e => e.dataset.job || ''")
    if key:
        page.keyboard.press(key)
    else:
        page.click(button)
    wait(page, """(before) => {
        const s = document.getElementById('prop-status').dataset;
        return s.job && s.job !== before && s.finished === 'succeeded';
    }""", before)
    page.log.check()


def download(page, tmp_path: Path, fmt: str | None) -> Path:
    if fmt:
        page.select_option("#export-format", fmt)
    with page.expect_download(timeout=120_000) as info:
        page.click("#export-button")
    dl = info.value
    path = tmp_path / dl.suggested_filename
    dl.save_as(path)
    return path


def mp4_frames(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(container.streams.video[0]))


def tab_to(page, selector: str, limit: int = 80) -> None:
    """Press Tab until `selector` has the focus (the keyboard-only way to reach a control)."""
    for _ in range(limit):
        if page.evaluate("s => document.activeElement?.matches(s) ?? false", selector):
            return
        page.keyboard.press("Tab")
    raise AssertionError(f"Tab never reached {selector}")


def upload_with_picker(page, video: Path) -> str:
    page.set_input_files("#file-input", str(video))
    wait(page, "() => document.getElementById('stage').dataset.frame === '0'")
    return session_id(page)


# ----------------------------------------------------------------------------- tests
def test_workflow_in_the_browser(page, server, video, shots, tmp_path):
    page.goto(server.url + "/")
    expect = sync_api.expect
    expect(page.locator("a[href='/docs']")).to_be_visible()
    expect(page.locator("#export-format option")).not_to_have_count(0)
    formats = httpx.get(f"{server.url}/export-formats").json()
    assert page.eval_on_selector_all("#export-format option", "os => os.map(o => o.value)") == [
        f["name"] for f in formats]

    # Upload through the file picker: frame 0 is drawn, the session id is in the URL.
    sid = upload_with_picker(page, video)
    frame0 = page.evaluate("""() => {
        const c = document.getElementById('frame-canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let lit = 0; for (let q = 0; q < d.length; q += 4) if (d[q] > 150 && d[q + 1] > 150) lit++;
        return {w: c.width, h: c.height, lit};
    }""")
    assert frame0["w"] == W and frame0["h"] == H and frame0["lit"] > 1000  # the yellow box
    desc = state(server, sid)
    assert desc["objects"] == [] and desc["mask_frames"] == []
    expect(page.locator(f"#sessions li[data-session='{sid}']")).to_have_count(1)
    page.screenshot(path=shots / "1-uploaded.png")

    # A positive click: the mask of object 1 is drawn in its colour; object 1 is listed.
    click_video(page, *BOX_CENTRE)
    settled(page)
    wait(page, "() => Number(document.getElementById('stage').dataset.maskPixels) > 0")
    desc = state(server, sid)
    assert [o["obj_id"] for o in desc["objects"]] == [1]
    color1 = desc["objects"][0]["color"]
    pixels = mask_pixels(page, color1)
    assert pixels["match"] > 0 and pixels["match"] == pixels["any"]
    assert prompts_of(desc) == {"1": {"0": {"points": [list(map(float, BOX_CENTRE))],
                                            "labels": [1], "box": None}}}
    assert page_prompts(page) == prompts_of(desc)
    assert desc["mask_frames"] == [0]
    expect(page.locator("#objects li[data-obj='1'][data-pending='false']")).to_have_count(1)
    assert page.evaluate(MARK_DOTS)["green"] > 0

    # Object 2, prompted with a dragged box.
    page.click("#add-object")
    expect(page.locator("#objects li[data-obj='2'][data-pending='true']")).to_have_count(1)
    drag_video(page, (200, 30), (290, 110))
    settled(page)
    expect(page.locator("#objects li[data-obj='2'][data-pending='false']")).to_have_count(1)
    desc = state(server, sid)
    assert [o["obj_id"] for o in desc["objects"]] == [1, 2]
    box = desc["current_prompts"]["2"]["0"]["box"]
    assert box == pytest.approx([200, 30, 290, 110], abs=2)
    assert desc["current_prompts"]["2"]["0"]["points"] == []
    assert page_prompts(page) == prompts_of(desc)
    page.screenshot(path=shots / "2-two-objects.png")

    # Propagate forward from frame 0: progress to the end, every frame on the strip.
    propagate(page)
    expect(page.locator("#prop-text")).to_contain_text(f"{FRAMES}/{FRAMES}")
    assert page.eval_on_selector("#strip", "e => e.dataset.maskFrames") == str(FRAMES)
    desc = state(server, sid)
    assert desc["mask_frames"] == list(range(FRAMES))
    (run,) = desc["propagations"]
    assert run["status"] == "done" and run["start_frame"] == 0
    assert page.eval_on_selector("#strip", "e => e.dataset.coveredFrames") == str(FRAMES)
    expect(page.locator("#objects li[data-obj='1'] .count")).to_have_text(
        f"{sum(1 for per in desc['scores'].values() if per.get('1', {}).get('visible'))} frames")
    page.screenshot(path=shots / "3-propagated.png")

    # Keyboard stepping. The frame has the focus from a click: arrows step frames (they move
    # the crosshair only when the frame was reached with Tab).
    page.locator("#marks-canvas").focus()
    page.keyboard.press("Shift+ArrowRight")
    wait(page, "() => document.getElementById('stage').dataset.frame === '10'")
    for _ in range(4):
        page.keyboard.press("ArrowLeft")
    page.keyboard.press("]")
    page.keyboard.press("a")
    wait(page, "() => document.getElementById('stage').dataset.frame === '6'")
    expect(page.locator("#frame-label")).to_have_text(f"Frame 6 / {FRAMES - 1}")
    assert int(stage(page)["maskPixels"]) > 0

    # Refine object 1 on frame 6 with a right click (a negative point), then re-propagate.
    page.keyboard.press("1")
    expect(page.locator("#objects li[data-obj='1'].active")).to_have_count(1)
    click_video(page, 60, 200, button="right")
    settled(page)
    desc = state(server, sid)
    assert desc["current_prompts"]["1"]["6"] == {"points": [[60.0, 200.0]], "labels": [0],
                                                "box": None, "mask": False}
    assert page_prompts(page) == prompts_of(desc)
    assert page.evaluate(MARK_DOTS)["red"] > 0
    page.screenshot(path=shots / "4-refined.png")
    propagate(page)
    assert page.eval_on_selector("#history", "e => e.dataset.count") == "2"
    desc = state(server, sid)
    first, second = desc["propagations"]
    assert second["start_frame"] == 6 and second["status"] == "done"
    assert second["passes"] == [{"direction": "forward", "from": 6, "to": FRAMES - 1,
                                 "last": FRAMES - 1}]
    assert desc["mask_frames"] == list(range(FRAMES))  # frames before 6 stay as they were
    assert page.eval_on_selector("#strip", "e => e.dataset.coveredFrames") == "6"
    expect(page.locator("#history li").first).to_contain_text("from 6")

    # Undo: an Alt+click adds a second negative point; Ctrl+Z takes it back, then the first.
    click_video(page, 300, 20, alt=True)
    settled(page)
    assert state(server, sid)["current_prompts"]["1"]["6"]["labels"] == [0, 0]
    page.keyboard.press("Control+z")
    settled(page)
    desc = state(server, sid)
    assert desc["current_prompts"]["1"]["6"]["points"] == [[60.0, 200.0]]
    page.keyboard.press("Control+z")
    settled(page)
    desc = state(server, sid)
    assert "6" not in desc["current_prompts"]["1"]
    assert [o["obj_id"] for o in desc["objects"]] == [1, 2]  # frame 0 still prompts object 1
    assert page_prompts(page) == prompts_of(desc)

    # Exports from the menu, downloaded as files.
    coco = json.loads(download(page, tmp_path, "coco_json").read_text())
    assert len(coco["images"]) == FRAMES and coco["annotations"]
    expect(page.locator("#export-result")).to_contain_text(".json")
    mp4 = download(page, tmp_path, "overlay_mp4")
    assert mp4.suffix == ".mp4" and mp4_frames(mp4) == FRAMES
    expect(page.locator("#export-result")).to_contain_text(re.compile(r"\.mp4 \([\d.]+ (KiB|MiB|B)\)"))
    page.screenshot(path=shots / "5-exported.png")


def test_keyboard_only(page, server, video, tmp_path):
    # Subscribe to file choosers before any is opened: a subscription made by
    # expect_file_chooser() alone can reach the browser after the chooser opened (flaky).
    page.on("filechooser", lambda chooser: None)
    page.goto(server.url + "/")
    sync_api.expect(page.locator("#export-format option")).not_to_have_count(0)
    tab_to(page, "#open-button")
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Enter")
    chooser.value.set_files(str(video))
    wait(page, "() => document.getElementById('stage').dataset.frame === '0'")
    sid = session_id(page)

    # The frame takes the focus; Enter adds a positive point at the crosshair (the centre).
    tab_to(page, "#marks-canvas")
    page.keyboard.press("Enter")
    settled(page)
    wait(page, "() => Number(document.getElementById('stage').dataset.maskPixels) > 0")
    desc = state(server, sid)
    assert desc["current_prompts"]["1"]["0"]["points"] == [[W / 2, H / 2]]
    # Arrows move the crosshair while the frame has the focus; Shift+Enter: a negative point.
    page.keyboard.press("ArrowUp")
    page.keyboard.press("Shift+Enter")
    settled(page)
    labels = state(server, sid)["current_prompts"]["1"]["0"]["labels"]
    assert labels == [1, 0] and stage(page)["frame"] == "0"

    tab_to(page, "#prop-forward")
    propagate(page, key="Enter")
    assert state(server, sid)["mask_frames"] == list(range(FRAMES))

    for _ in range(3):
        page.keyboard.press("]")
    wait(page, "() => document.getElementById('stage').dataset.frame === '3'")

    tab_to(page, "#export-button")
    with page.expect_download(timeout=120_000) as info:
        page.keyboard.press("Enter")
    path = tmp_path / info.value.suggested_filename
    info.value.save_as(path)
    assert mp4_frames(path) == FRAMES  # the first format in the menu: overlay_mp4

    page.keyboard.press("?")
    sync_api.expect(page.locator("#help-dialog")).to_be_visible()
    page.keyboard.press("Escape")
    sync_api.expect(page.locator("#help-dialog")).to_be_hidden()


def test_access_keys(page, tmp_path, checkpoint, video):
    srv = Server(server_env(tmp_path, checkpoint, SAM2_API_KEYS=KEY), tmp_path / "keys.log").start()
    try:
        # The wrong key's 401s are logged by the browser as failed loads: expected here.
        page.log.allowed = re.compile(r"status of 401")
        page.goto(srv.url + "/")
        dialog = page.locator("#key-dialog")
        sync_api.expect(dialog).to_be_visible()
        page.fill("#key-input", "not-the-key")
        page.click("#key-ok")
        sync_api.expect(page.locator("#messages .message").first).to_contain_text("HTTP 401")
        sync_api.expect(dialog).to_be_visible()  # asked again
        page.fill("#key-input", KEY)
        page.click("#key-ok")
        sync_api.expect(dialog).to_be_hidden()
        sync_api.expect(page.locator("#export-format option")).not_to_have_count(0)
        page.click("#messages .message button")  # dismissable

        sid = upload_with_picker(page, video)
        click_video(page, *BOX_CENTRE)
        settled(page)
        wait(page, "() => Number(document.getElementById('stage').dataset.maskPixels) > 0")
        desc = state(srv, sid, KEY)
        assert [o["obj_id"] for o in desc["objects"]] == [1] and desc["mask_frames"] == [0]
        assert httpx.get(f"{srv.url}/session/{sid}").status_code == 401
        assert page.evaluate("() => sessionStorage.getItem('sam2.key')") == KEY
        assert not [e for e in page.log.errors if "401" not in e]
    finally:
        page.close()
        srv.stop()


def test_reload_and_restart_restore_the_session(page, tmp_path, checkpoint, video, shots):
    env = server_env(tmp_path, checkpoint)
    srv = Server(env, tmp_path / "restart.log").start()
    try:
        with srv.client() as c:
            with open(video, "rb") as f:
                sid = c.post("/upload-video", files={"file": ("clip.mp4", f, "video/mp4")}).json()[
                    "session_id"]
            r = c.post(f"/annotate-frame/{sid}", json={"frame_idx": 0, "points": [
                {"x": 85, "y": 120, "label": 1}, {"x": 300, "y": 200, "label": 0}]})
            assert r.status_code == 200, r.text
            r = c.post(f"/annotate-frame/{sid}", json={"frame_idx": 4, "obj_id": 3,
                                                         "box": [150, 60, 260, 180]})
            assert r.status_code == 200, r.text
            assert c.post(f"/propagate/{sid}", json={"start_frame": 0}).status_code == 200
            big = make_video(tmp_path / "hd.mp4", num_frames=3, width=1920, height=1080)
            with open(big, "rb") as f:
                hd = c.post("/upload-video", files={"file": ("hd.mp4", f, "video/mp4")}).json()[
                    "session_id"]
        srv.terminate()
        srv.start()  # same folders: the session is reopened from disk on its first request
        before = state(srv, sid)

        def check_restored():
            wait(page, f"() => document.getElementById('strip').dataset.maskFrames === '{FRAMES}'")
            wait(page, "() => Number(document.getElementById('stage').dataset.maskPixels) > 0")
            objects = page.eval_on_selector_all("#objects li", "ls => ls.map(l => l.dataset.obj)")
            assert objects == ["1", "3"]
            assert page_prompts(page) == prompts_of(before)
            dots = page.evaluate(MARK_DOTS)
            assert dots["green"] > 0 and dots["red"] > 0
            assert page.eval_on_selector("#strip", "e => e.dataset.promptFrames") == "2"
            sync_api.expect(page.locator("#history li")).to_have_count(1)

        page.goto(f"{srv.url}/?session={sid}")
        check_restored()
        page.screenshot(path=shots / "6-restored.png")
        page.reload()
        check_restored()
        assert state(srv, sid)["current_prompts"] == before["current_prompts"]

        # The recent sessions: open the 1080p one; it fits a laptop window with the page.
        sessions = page.locator("#sessions li")
        sync_api.expect(sessions).to_have_count(2)
        page.click(f"#sessions li[data-session='{hd}'] button.open")
        wait(page, f"() => location.search === '?session={hd}'")
        wait(page, "() => document.getElementById('stage').dataset.frame === '0'")
        st = page.locator("#stage").bounding_box()
        strip = page.locator("#strip").bounding_box()
        assert st["width"] / st["height"] == pytest.approx(16 / 9, rel=0.01)
        assert st["x"] >= 0 and st["x"] + st["width"] <= VIEWPORT["width"]
        assert strip["y"] + strip["height"] <= VIEWPORT["height"]
        assert st["width"] > 800  # fitted to the space, not shrunk to nothing

        # Delete it, with the confirmation accepted.
        page.once("dialog", lambda d: d.accept())
        page.click(f"#sessions li[data-session='{hd}'] button:has-text('Delete')")
        sync_api.expect(sessions).to_have_count(1)
        assert httpx.get(f"{srv.url}/session/{hd}").status_code == 404
        assert "session=" not in page.url
    finally:
        page.close()  # before the server goes: requests still in flight would fail
        srv.stop()
