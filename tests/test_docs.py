"""What people look at renders: the documentation site builds with `mkdocs build --strict` (no warning: no broken
link or anchor), and every page of it, and a real `report.html`, opened in headless Chromium, load every image and
resolve every link.

The browser is Debian's `chromium` with its `chromium-driver` (`apt-get install -y chromium chromium-driver`;
`.ci/run` installs them), driven by Selenium through that chromedriver, so Selenium Manager never downloads one.
Links to other sites are not followed (the test machines have no internet).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import typing
import urllib.error
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urldefrag, urlparse

import pytest
from pydantic import BaseModel
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service

from pipeline.checkpoint.checkpointer import Checkpointer
from pipeline.config import Config, load_config
from pipeline.evaluation.watcher import CheckpointWatcher
from pipeline.train.step import build_train_state

REPO = Path(__file__).resolve().parents[1]
MKDOCS_CONFIG = REPO / "infra" / "docs" / "mkdocs.yml"
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")

# Every image's load and decode, awaited (a lazy image is made eager first), then what the page links to and the
# ids its links may point at, all from the rendered DOM.
RENDERED = """
const done = arguments[arguments.length - 1];
const images = [...document.images];
images.forEach(img => { img.loading = "eager"; });
Promise.all(images.map(img => img.decode().then(() => true, () => false))).then(() => done({
  images: images.map(img => ({src: img.currentSrc || img.src, alt: img.alt, width: img.naturalWidth})),
  links: [...document.querySelectorAll("a[href]")].map(a => a.href),
  ids: [...document.querySelectorAll("[id]")].map(e => e.id),
  location: location.href,
  title: document.title,
}));
"""


def build_site(site_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's notice about its successor, not about our pages
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(MKDOCS_CONFIG),
                           "--site-dir", str(site_dir)], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site_dir = tmp_path_factory.mktemp("docs-site")
    built = build_site(site_dir)
    assert built.returncode == 0, f"mkdocs build --strict failed:\n{built.stdout}\n{built.stderr}"
    warnings = [line for line in built.stderr.splitlines() if "WARNING" in line]
    assert not warnings, "\n".join(warnings)
    return site_dir


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def serving(directory: Path) -> Iterator[str]:
    """`directory` over HTTP on 127.0.0.1, as a browser reads a site (directory URLs, 404s); stopped by its PID."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
                               "--directory", str(directory)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "http.server did not start"
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def served_site(site: Path) -> Iterator[str]:
    with serving(site) as base:
        yield base


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.is_file()]
    if missing:
        pytest.fail(f"headless Chromium is needed to check the rendered docs and report, and {missing} is missing: "
                    "install Debian's packages with `apt-get install -y chromium chromium-driver` (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1000"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(60)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


class _ServedIds(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.ids.update(value for name, value in attrs if name == "id" and value)


def served_ids(url: str) -> set[str]:
    """The ids in the HTML as served, read apart from the browser."""
    with urllib.request.urlopen(urldefrag(url)[0], timeout=10) as response:
        parser = _ServedIds()
        parser.feed(response.read().decode())
    return parser.ids


def rendered(driver: webdriver.Chrome, url: str, attempts: int = 3) -> dict[str, Any]:
    """The page as Chromium renders it; a fetch that fails is tried again, then refused clearly, so a flaky fetch
    never reads as a broken page. A fetch fails when Selenium says so, or when what Chromium shows is not the whole
    page: no title, another URL, or an id of the served HTML missing. On a loaded machine Chromium has shown, with
    no error, a served page with no title and no ids, and served pages cut short (the title and 0 of their ids, or
    17 of the reference's few hundred)."""
    for attempt in range(attempts):
        try:
            driver.get(url)
            page = driver.execute_async_script(RENDERED)
            missing = sorted(served_ids(url) - set(page["ids"]))
            if page["title"] and urldefrag(page["location"])[0] == urldefrag(url)[0] and not missing:
                return page
            failure = (f"Chromium showed {page['location']!r}, titled {page['title']!r}, with {len(page['ids'])} ids"
                       + (f", {len(missing)} ids of the served HTML missing ({', '.join(missing[:5])})"
                          if missing else ""))
        except WebDriverException as error:
            failure = error.msg
        except OSError as error:
            failure = f"the served HTML could not be read: {error}"
        time.sleep(1 + attempt)
    raise AssertionError(f"{url}: Chromium could not load it in {attempts} attempts: {failure}")


def broken_images(page: dict[str, Any]) -> list[str]:
    return [image["src"][:100] for image in page["images"] if not image["width"]]


def page_urls(site: Path, base: str) -> list[str]:
    """Every HTML page of the built site, as the URL a reader opens (directory URLs end in /)."""
    pages = sorted(path.relative_to(site).as_posix() for path in site.rglob("*.html") if path.name != "404.html")
    return [base + page.removesuffix("index.html") for page in pages]


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_the_site_builds_without_warnings_and_holds_every_page(site: Path) -> None:
    pages = {path.relative_to(site).as_posix() for path in site.rglob("index.html")}
    expected = {"index.html", *(f"{name}/index.html" for name in (
        "concepts", "architecture", "configuration", "reference", "data", "training", "faults", "evaluation",
        "use-your-model", "benchmarks", "troubleshooting", "clusters", "scaling"))}
    assert expected <= pages, f"pages missing from the site: {sorted(expected - pages)}"


def schema_keys(section: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key of the schema, a section that may be null (`data.demo`) and its keys included."""
    keys = []
    for name, field in section.model_fields.items():
        inner = [t for t in (field.annotation, *typing.get_args(field.annotation))
                 if isinstance(t, type) and issubclass(t, BaseModel)]
        if not inner or inner[0] is not field.annotation:
            keys.append(f"{prefix}{name}")
        if inner:
            keys += schema_keys(inner[0], f"{prefix}{name}.")
    return keys


def test_the_configuration_reference_lists_every_key_of_the_schema(site: Path) -> None:
    """Generated from the schema at build time: every setting is there, with its default."""
    reference = (site / "reference" / "index.html").read_text()
    keys = schema_keys(Config)
    assert len(keys) > 100 and "data.demo.variant" in keys
    missing = [key for key in keys if f"<code>{key}</code>" not in reference]
    assert not missing, f"keys not in the configuration reference: {missing}"
    defaults = Config()
    assert f"<code>{defaults.train.total_steps}</code>" in reference and "<code>rmsprop_tf</code>" in reference


def rendering_problems(driver: webdriver.Chrome, urls: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Open every URL: (each image that did not load, each link to the same site that does not answer 200, each
    #anchor with no element of that id on its page; the rendered pages)."""
    seen = {url: rendered(driver, url) for url in urls}
    problems = [f"{url}: image {src} did not load" for url, page in seen.items() for src in broken_images(page)]
    ids = {url: set(page["ids"]) for url, page in seen.items()}
    status: dict[str, int] = {}
    for url, page in seen.items():
        for link in page["links"]:
            target, anchor = urldefrag(link)
            if urlparse(target).netloc != urlparse(url).netloc:
                continue  # another site: not followed
            if target not in ids:
                status.setdefault(target, http_status(target))
                if status[target] != 200:
                    problems.append(f"{url}: link {link} answers {status[target]}")
                elif anchor:
                    ids[target] = set(rendered(driver, target)["ids"])
            if anchor and target in ids and anchor not in ids[target]:
                problems.append(f"{url}: link {link}: no element with id {anchor!r} on that page "
                                f"({len(ids[target])} ids there)")
    return problems, seen


def test_every_page_of_the_site_renders_its_images_and_links(served_site: str, site: Path,
                                                            browser: webdriver.Chrome) -> None:
    """Every page opened in headless Chromium: each image loaded (naturalWidth > 0), each link to the site
    answers 200, each #anchor names an element of its page."""
    problems, seen = rendering_problems(browser, page_urls(site, served_site))
    assert not problems, "\n".join(problems)
    assert len(seen) >= 14 and sum(len(page["images"]) for page in seen.values()) >= 1
    assert sum(len(page["links"]) for page in seen.values()) > 500


def test_the_checks_see_a_broken_image_link_and_anchor(tmp_path: Path, browser: webdriver.Chrome) -> None:
    """Otherwise the site's check could pass vacuously."""
    (tmp_path / "page").mkdir()
    (tmp_path / "page" / "index.html").write_text('<title>page</title><p id="here">a page</p>')
    (tmp_path / "index.html").write_text(
        '<title>index</title><img src="missing.png"><a href="page/#here">fine</a><a href="page/#nowhere">no anchor</a>'
        '<a href="#here">no anchor here</a><a href="gone/">no page</a><a href="https://example.org/">outside</a>')
    with serving(tmp_path) as base:
        problems, _ = rendering_problems(browser, [base])
    assert problems == [f"{base}: image {base}missing.png did not load",
                        f"{base}: link {base}page/#nowhere: no element with id 'nowhere' on that page (1 ids there)",
                        f"{base}: link {base}#here: no element with id 'here' on that page (0 ids there)",
                        f"{base}: link {base}gone/ answers 404"], problems


def test_a_page_chromium_cannot_fetch_is_refused_clearly(tmp_path: Path, browser: webdriver.Chrome) -> None:
    """A fetch that fails (here: the server is gone, or what Chromium shows is not the served page: no title, or an
    id of the served HTML missing) is tried again, then refused with what Chromium said or showed."""
    (tmp_path / "index.html").write_text('<title>index</title><p id="here">a page</p>')
    (tmp_path / "blank.html").write_text("<p>no title</p>")
    (tmp_path / "cut.html").write_text('<title>cut</title><p id="kept">x</p><p id="cut">y</p>'
                                       '<script>document.getElementById("cut").remove()</script>')
    with serving(tmp_path) as base:
        assert rendered(browser, base)["ids"] == ["here"]
        with pytest.raises(AssertionError, match=r"could not load it in 1 attempts: Chromium showed .*blank\.html', "
                                                 r"titled '', with 0 ids"):
            rendered(browser, base + "blank.html", attempts=1)
        with pytest.raises(AssertionError, match=r"with 1 ids, 1 ids of the served HTML missing \(cut\)"):
            rendered(browser, base + "cut.html", attempts=1)
    with pytest.raises(AssertionError, match=r"could not load it in 2 attempts: .*ERR_CONNECTION_REFUSED"):
        rendered(browser, base, attempts=2)


@pytest.fixture(scope="module")
def report(tiny_demo: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real report.html: two checkpoints of a small model on the tiny demo, scored by the checkpoint-watching
    evaluator as `jobs/evaluate_map.py` runs it."""
    run_storage = tmp_path_factory.mktemp("report-runs")
    config = load_config("demo", [
        "model.width_multiplier=0.125", "model.middle_blocks=1", "data.image_size=71", f"data.train={tiny_demo.train}",
        f"data.eval={tiny_demo.eval}", f"model.num_classes={tiny_demo.num_classes}", f"run.storage={run_storage}",
        "eval.batch_size=16", "checkpoint.background=false"])
    state = build_train_state(config)
    saver = Checkpointer(config.run_dir, config)
    for step in (1, 2):
        saver.save(step, state.state_dict())
    assert [e.step for e in CheckpointWatcher(config.run_dir, config, tensorboard=False).run(once=True)] == [1, 2]
    return Path(config.run_dir) / "reports" / "report.html"


def test_the_report_renders_every_plot(report: Path, browser: webdriver.Chrome) -> None:
    """The evaluator's report opened as a reader opens the downloaded file: every embedded plot decodes."""
    page = rendered(browser, report.as_uri())
    plots = sorted(image["alt"] for image in page["images"])
    assert plots == ["ap_vs_frequency.png", "best_worst_classes.png", "examples.png", "map_by_frequency.png",
                     "map_curve.png"]
    assert not broken_images(page), broken_images(page)
    assert all(image["width"] >= 300 for image in page["images"])
    assert all(urldefrag(link)[0] == report.as_uri() or urlparse(link).scheme in ("http", "https")
               for link in page["links"]), page["links"]
