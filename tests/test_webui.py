"""The chat page at `/`: how `/` tells a browser from an Ollama probe, what is public, and the page
itself in headless Chromium (Debian's `chromium` + `chromium-driver`, driven by Selenium) against a
real server process: streaming, reasoning that folds away, Stop, regenerate, conversations kept
across a reload, the API key, and a screenshot (benchmarks/results/webui-screenshot.png)."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import httpx
import pytest
from conftest import build_hf_model, forbid_tokens
from fastapi.testclient import TestClient
from server_harness import metric, running_server, wait_idle
from tokenizers import Tokenizer

from sugam.serve.app import ServerConfig, create_app
from sugam.serve.webui import CSP, PROBE_TEXT

KEY = "webui-key"
HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
SCREENSHOT = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "webui-screenshot.png"
# DeepSeek-R1-Distill / QwQ style: the template opens the thought, the model closes it (here the
# thinking budget the page sends makes the engine close it).
THINKING_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")


# ---- `/` and the files, in process ----------------------------------------------------------

def client(**config) -> TestClient:
    """The app without its lifespan (no engine loads): enough for the page, the probe and auth."""
    return TestClient(create_app(ServerConfig(model_name="tiny", **config), load_engine=lambda: None))


def test_root_is_the_page_for_browsers_and_the_ollama_probe_for_others():
    c = client()
    page = c.get("/", headers=HTML)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["content-security-policy"] == CSP and "default-src 'self'" in CSP
    assert page.headers["vary"] == "Accept" and page.headers["x-content-type-options"] == "nosniff"
    assert '<script type="module" src="ui/app.js"></script>' in page.text
    assert not re.search(r"<script(?![^>]*\bsrc=)", page.text), "inline script: the CSP would block it"
    assert not re.search(r"\son\w+=|style=", page.text), "inline handlers or styles: the CSP would block them"
    for accept in (None, "*/*", "application/json"):  # curl, the ollama packages, scripts
        probe = c.get("/", headers={"Accept": accept} if accept else {})
        assert probe.status_code == 200 and probe.text == PROBE_TEXT
        assert probe.headers["content-type"].startswith("text/plain")
    assert c.head("/").status_code == 200 and c.head("/", headers=HTML).status_code == 200


def test_assets_are_a_fixed_set():
    c = client()
    for name, kind in (("app.js", "text/javascript"), ("markdown.js", "text/javascript"), ("style.css", "text/css"),
                       ("favicon.svg", "image/svg+xml")):
        r = c.get(f"/ui/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind) and r.content
    for path in ("/ui/index.html", "/ui/nothing.js", "/ui/..%2Fwebui.py", "/ui/../webui.py", "/ui/%2e%2e/app.py"):
        assert c.get(path).status_code == 404, path


def test_page_is_public_and_the_api_stays_guarded():
    c = client(api_key=KEY)
    assert c.get("/", headers=HTML).status_code == 200
    assert c.get("/ui/app.js").status_code == 200
    assert c.get("/").text == PROBE_TEXT
    assert c.get("/v1/models").status_code == 401
    assert c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_no_webui_leaves_only_the_probe():
    c = client(webui=False)
    r = c.get("/", headers=HTML)
    assert r.status_code == 200 and r.text == PROBE_TEXT and "content-security-policy" not in r.headers
    assert c.head("/").status_code == 200
    assert c.get("/ui/app.js").status_code == 404


def test_cli_flag():
    from sugam.cli import build_parser

    assert build_parser().parse_args(["serve", "m", "--no-webui"]).no_webui
    assert not build_parser().parse_args(["serve", "m"]).no_webui


# ---- the page in a real browser -------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("headless Chromium is not installed (apt-get install chromium chromium-driver; .ci/run does)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the test extra)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,860", "--force-prefers-reduced-motion"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    except Exception as exc:  # e.g. a driver that does not match the browser
        pytest.skip(f"headless Chromium did not start: {exc}")
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def thinker(tmp_path_factory):
    """A tiny model that thinks first (its template opens <think>) and never ends on its own, plus a
    LoRA adapter for the model picker."""
    from test_lora import make_peft_adapter

    root = tmp_path_factory.mktemp("webui")
    folder = root / "thinker"
    model = build_hf_model(folder, "qwen2", max_position_embeddings=2048)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    # The end token and the think tags are never sampled: only the thinking budget ends the
    # thought, only max_tokens (or Stop) the answer.
    forbid_tokens(model, map(tok.token_to_id, ("<|im_end|>", "<think>", "</think>")))
    model.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(THINKING_TEMPLATE)
    make_peft_adapter(model, root / "sql", seed=1)
    return folder, root / "sql"


@pytest.fixture(scope="module")
def server(thinker):
    folder, adapter = thinker
    with running_server(str(folder), "--api-key", KEY, "--dtype", "float32", "--served-model-name", "tiny",
                        "--lora", f"sql={adapter}") as (base, _):
        yield base


def severe_logs(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def wait(driver, condition, timeout=30.0, what="condition"):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d), message=what)


def set_field(driver, element_id: str, value: str) -> None:
    """Type into a settings field as a user does (the page saves on change, i.e. on leaving it)."""
    from selenium.webdriver.common.keys import Keys

    field = driver.find_element("id", element_id)
    field.clear()
    if value:
        field.send_keys(value)
    field.send_keys(Keys.TAB)


def send(driver, text: str) -> None:
    from selenium.webdriver.common.keys import Keys

    driver.find_element("id", "prompt").send_keys(text, Keys.ENTER)


def last_answer(driver) -> dict:
    return driver.execute_script("""
        const a = [...document.querySelectorAll('#messages article.assistant')].at(-1);
        if (!a) return null;
        const d = a.querySelector(':scope > .reasoning');
        return {open: d.open, hidden: d.hidden, summary: d.querySelector('summary').textContent,
                reasoning: d.querySelector('.thought').textContent.length,
                content: a.querySelector(':scope > .content').textContent.length,
                error: a.querySelector(':scope > .message-error').textContent,
                meta: a.querySelector(':scope > .meta').textContent, busy: a.getAttribute('aria-busy')};""")


# Records the last answer's state at every change of the message list (a MutationObserver), so the
# test sees each step of a stream, however fast the model is.
RECORD = """
window.__states = [];
const record = () => {
  const a = [...document.querySelectorAll('#messages article.assistant')].at(-1);
  if (!a) return;
  const d = a.querySelector(':scope > .reasoning');
  window.__states.push({open: d.open, hidden: d.hidden, reasoning: d.querySelector('.thought').textContent.length,
                        content: a.querySelector(':scope > .content').textContent.length,
                        busy: a.getAttribute('aria-busy'), stop: !document.getElementById('stop').hidden});
};
new MutationObserver(record).observe(document.getElementById('messages'),
  {subtree: true, childList: true, attributes: true, characterData: true});
"""


def test_chat_page_in_a_browser(browser, server, tmp_path):
    d = browser
    started = time.monotonic()
    d.get(server + "/")
    wait(d, lambda d: d.find_element("id", "error").is_displayed(), what="the 401 from /v1/models shown")
    banner = d.find_element("id", "error").text
    assert "401" in banner and "API key" in banner, banner
    assert d.find_element("id", "settings").get_attribute("open") is not None  # opened to show the key field
    # the only console errors so far: the refused /v1/models (no key yet)
    assert all("status of 401" in m for m in severe_logs(d)), severe_logs(d)

    # a wrong key: the server's message in the banner, and in the answer of a message sent with it
    set_field(d, "api-key", "wrong")
    send(d, "Hello?")
    wait(d, lambda d: (last_answer(d) or {}).get("error"), what="the 401 shown in the answer")
    assert "missing or wrong API key" in last_answer(d)["error"]

    # the right key: the model picker fills with the base model and its adapter
    set_field(d, "api-key", KEY)
    wait(d, lambda d: len(d.find_elements("css selector", "#model option")) == 2, what="the models listed")
    options = [(o.get_attribute("value"), o.text) for o in d.find_elements("css selector", "#model option")]
    assert options == [("tiny", "tiny"), ("sql", "sql (LoRA adapter on tiny)")]
    assert not d.find_element("id", "error").is_displayed()
    set_field(d, "max-tokens", "160")
    set_field(d, "thinking-budget", "60")
    set_field(d, "system-prompt", "You are terse.")
    set_field(d, "temperature", "0.8")
    d.get_log("browser")  # the 401s above were expected

    # regenerate the refused answer: it streams, thinking first (open), then the answer (thought folded)
    d.execute_script(RECORD)
    d.find_element("id", "regenerate").click()
    wait(d, lambda d: last_answer(d)["busy"] == "false" and last_answer(d)["content"] > 0, what="the answer")
    states = d.execute_script("return window.__states")
    assert all(s["stop"] for s in states if s["busy"] == "true"), "Stop is offered while it streams"
    answer = last_answer(d)
    assert not answer["error"] and len(d.find_elements("css selector", "#messages article.assistant")) == 1
    thinking = [s for s in states if s["busy"] == "true" and not s["hidden"] and s["reasoning"] and not s["content"]]
    assert thinking and all(s["open"] for s in thinking), "the thought is open while it streams"
    assert not any(s["open"] and s["content"] for s in states), "the thought folds when the answer starts"
    growth = sorted({s["content"] for s in states if s["busy"] == "true"})
    assert len(growth) >= 3, f"the answer arrived in pieces: {growth}"
    assert not answer["open"] and answer["summary"].startswith("Thought for") and answer["reasoning"] > 0
    # tokens/s from the stream's usage: 160 tokens (60 thinking, </think>, 99 answer), cut at max_tokens
    assert re.fullmatch(r"160 tokens · [\d.]+ tok/s · first token [\d.]+ s · cut at the token limit",
                        answer["meta"]), answer["meta"]
    assert not d.find_element("id", "stop").is_displayed() and d.find_element("id", "send").is_enabled()

    # a second conversation; Stop cancels a long answer and the server frees its KV blocks
    first_title = d.find_element("css selector", ".conversation[aria-current=true]").text
    assert first_title == "Hello?"
    d.find_element("id", "new-chat").click()
    set_field(d, "max-tokens", "")  # until the context is full: ~1900 tokens
    send(d, "Tell me a long story")
    wait(d, lambda d: (last_answer(d) or {}).get("content", 0) > 20, what="the long answer streaming")
    assert metric(server, "sugam_requests_running") == 1 and metric(server, "sugam_kv_cache_usage_ratio") > 0
    stop = d.find_element("id", "stop")
    assert stop.is_displayed()
    # the layout keeps the composer in view; the click is the element's own, not at a point of the
    # screen, so a repaint of the streaming answer at that instant cannot take it
    d.execute_script("arguments[0].scrollIntoView({block: 'nearest'}); arguments[0].click();", stop)
    wait(d, lambda d: last_answer(d)["busy"] == "false", what="the stream stopped")
    assert "stopped" in last_answer(d)["meta"] and not last_answer(d)["error"]
    wait_idle(server, timeout=10)  # the abort reached the engine: nothing running, no KV block held

    # a markdown answer is rendered from text only (the model's output never becomes HTML)
    rendered = d.execute_async_script("""
        const [source, done] = arguments;
        import(location.origin + '/ui/markdown.js').then((m) => {
          const div = document.createElement('div');
          div.append(m.renderMarkdown(source));
          done(div.innerHTML);
        });""", "## Title\n\n**bold** and *it* `code` [web](https://example.com/x) [js](javascript:alert%281%29)\n\n"
                 "- one\n- two\n  1. nested\n\n```python\nprint('<b>')\n```\n<img src=x onerror=alert(1)>")
    for piece in ("<h2>Title</h2>", "<strong>bold</strong>", "<em>it</em>", "<code>code</code>",
                  '<a href="https://example.com/x" rel="noopener noreferrer" target="_blank">web</a>', " js",
                  "<li>one</li>", "<ol><li>nested</li></ol>", 'class="language-python">print(\'&lt;b&gt;\')',
                  "&lt;img src=x onerror=alert(1)&gt;"):
        assert piece in rendered, (piece, rendered)
    assert "javascript:" not in rendered and "<img" not in rendered

    # both conversations survive a reload (localStorage); the first still holds its answer
    d.refresh()
    wait(d, lambda d: len(d.find_elements("css selector", "#model option")) == 2, what="the page back")
    titles = [b.text for b in d.find_elements("css selector", ".conversation")]
    assert titles == ["Tell me a long story", "Hello?"], titles
    d.find_elements("css selector", ".conversation")[1].click()
    answer = last_answer(d)
    assert answer["content"] > 0 and answer["reasoning"] > 0 and not answer["open"] and "tok/s" in answer["meta"]
    assert d.find_element("id", "api-key").get_attribute("value") == KEY
    assert severe_logs(d) == [], "console errors"

    d.find_element("css selector", "article.assistant .reasoning summary").click()  # unfold the thought
    shot = tmp_path / "webui-screenshot.png"
    d.get_screenshot_as_file(str(shot))
    assert shot.stat().st_size > 10_000
    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SCREENSHOT)
    # the probe answers non-browsers on the real server too
    assert httpx.get(server + "/", timeout=10).text == PROBE_TEXT and httpx.head(server + "/").status_code == 200
    assert time.monotonic() - started < 60
