"""Every fenced code block of the user guide and of README.md runs as printed, and the
guide builds with ``mkdocs build --strict``.

The pages are README.md and every page of mkdocs.yml's nav (docs/). Each page is one
test: its blocks run in order in one session, as a reader working through the page in
one terminal would run them. The conventions, in short (docs_harness.py has them all):

* ```python blocks are complete programs, each run on its own in a new directory (with
  the session's environment); a ```python block made of snippet lines
  (``--8<-- "examples/..."``) runs as the module it includes;
* ```bash blocks run with ``bash -e -o pipefail`` in the page's temporary directory
  (which links the repository's ``examples`` and ``.venv``), each starting with the
  working directory and exported variables the previous one left; processes started
  with ``&`` are killed when the page ends;
* ```text, ```json and ```mermaid blocks are shown only; any other language fails;
* HTML comments right above a block steer the harness: ``<!-- docs-test: background
  until "TEXT" -->`` (a server), ``prints "TEXT"``, ``replace "A" with "B"``, ``needs
  postgres nats rabbitmq``, ``timeout SECONDS``;
* from the first block marked ``needs ...`` on, a page has ``SAGAKIT_STORE_URL`` and
  ``SAGAKIT_BROKER_URL`` with a prefix of its own (its schemas, stream and queues are
  deleted afterwards); a page whose blocks use the shared servers gets their pytest
  markers;
* the README's set-up block (``python3 dev.py demo`` / ``test``) is what this test runs
  in: it is checked against dev.py, not run.

A failing block fails its page's test with the file and line of the block, the block
as run, and the end of its output.

The selected pages run side by side, each in a thread of its own, started when the first
page's test begins (a page mostly waits on its commands, e.g. a demo's retry backoffs);
the pages that use the guide's API port run one after another in one thread. Each
page's test then reports its own page.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
import yaml
from docs_harness import ROOT, DocsError, needs, parse, run_page, uses_api_port


class _Loader(yaml.SafeLoader):
    """mkdocs.yml with its tags (``!relative``, ``!!python/name:``) read as plain text."""


_Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
_Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)


def nav_pages() -> list[str]:
    """The pages of mkdocs.yml's nav, in order (paths relative to docs/)."""
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_Loader)

    def walk(items: object) -> list[str]:
        out: list[str] = []
        if isinstance(items, str):
            return [items]
        if isinstance(items, list):
            for item in items:
                out += walk(item)
        elif isinstance(items, dict):
            for value in items.values():
                out += walk(value)
        return out

    return walk(config["nav"])


PAGES = [ROOT / "README.md", *(ROOT / "docs" / p for p in nav_pages())]


def _param(page: Path) -> object:
    try:
        used = needs(parse(page))
    except (DocsError, OSError):
        used = set()  # the page's test reports it
    marks = [getattr(pytest.mark, s) for s in sorted(used)]
    return pytest.param(page, marks=marks, id=str(page.relative_to(ROOT)))


PAGE_TEST = "test_every_block_of_the_page_runs"


def _run_pages(pages: list[tuple[Path, Path, Future[None]]]) -> None:
    """Run each page under its directory, one after another, into its future."""
    for page, base, done in pages:
        try:
            run_page(page, base)
        except BaseException as exc:
            done.set_exception(exc)
        else:
            done.set_result(None)


def _on_api_port(page: Path) -> bool:
    try:
        return uses_api_port(parse(page))
    except (DocsError, OSError):
        return False  # the page's run reports it


@pytest.fixture(scope="module")
def page_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[Path, Future[None]]]:
    """The selected pages, all started now (see the module docstring): page -> its run."""
    pages = [
        item.callspec.params["page"]
        for item in request.session.items
        if getattr(item, "module", None) is request.module
        and getattr(item, "originalname", None) == PAGE_TEST
    ]
    runs: dict[Path, Future[None]] = {}
    port: list[tuple[Path, Path, Future[None]]] = []
    alone: list[tuple[Path, Path, Future[None]]] = []
    for i, page in enumerate(pages):
        runs[page] = Future()
        run = (page, tmp_path_factory.mktemp(f"page{i}-{page.stem}"), runs[page])
        (port if _on_api_port(page) else alone).append(run)
    threads = [threading.Thread(target=_run_pages, args=([run],)) for run in alone]
    if port:
        threads.append(threading.Thread(target=_run_pages, args=(port,)))
    for t in threads:
        t.start()
    try:
        yield runs
    finally:
        for t in threads:  # every page's processes stopped, its servers' data deleted
            t.join()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("page", [_param(p) for p in PAGES])
def test_every_block_of_the_page_runs(page: Path, page_runs: dict[Path, Future[None]]) -> None:
    page_runs[page].result()


def test_every_page_in_docs_is_in_the_guide() -> None:
    """No page escapes these tests (mkdocs --strict refuses omitted pages too)."""
    docs = ROOT / "docs"
    in_docs = {p.relative_to(docs).as_posix() for p in docs.rglob("*.md")}
    assert in_docs == set(nav_pages()), "add the page to mkdocs.yml's nav"


def test_the_guide_builds_strictly(tmp_path: Path) -> None:
    site = tmp_path / "site"
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    quickstart = (site / "quickstart" / "index.html").read_text()
    # The example's code is on the page, included from examples/travel.
    assert "partners_of" in quickstart and "--8&lt;--" not in quickstart


# -- the harness itself ------------------------------------------------------------------
def _page(tmp_path: Path, text: str) -> Path:
    page = tmp_path / "page.md"
    page.write_text(text)
    return page


def test_a_failing_block_is_named_by_file_and_line(tmp_path: Path) -> None:
    page = _page(tmp_path, "# A page\n\n```bash\necho fine\n```\n\n```bash\nfalse\n```\n")
    with pytest.raises(DocsError, match=r"page\.md:7: the bash block failed: exit status 1"):
        run_page(page, tmp_path / "run")


def test_bash_blocks_share_exported_variables_and_the_directory(tmp_path: Path) -> None:
    page = _page(
        tmp_path,
        "```bash\nexport GREETING=hello\nmkdir sub && cd sub\n```\n\n"
        '<!-- docs-test: prints "hello from sub" -->\n'
        '```bash\necho "$GREETING from $(basename "$PWD")"\n```\n',
    )
    run_page(page, tmp_path / "run")


def test_unknown_languages_and_markers_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DocsError, match=r"page\.md:1: a ```\(no language\) block"):
        parse(_page(tmp_path, "```\nls\n```\n"))
    with pytest.raises(DocsError, match="unknown docs-test marker 'sometimes'"):
        parse(_page(tmp_path, "<!-- docs-test: sometimes -->\n```bash\nls\n```\n"))


def test_a_missing_output_fails(tmp_path: Path) -> None:
    page = _page(
        tmp_path,
        '<!-- docs-test: prints "bye" -->\n<!-- docs-test: timeout 3 -->\n'
        '```python\nprint("hi")\n```\n',
    )
    with pytest.raises(DocsError, match="its output lacks 'bye'"):
        run_page(page, tmp_path / "run")


def test_background_processes_are_stopped_with_the_page(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    page = _page(
        tmp_path,
        f"```bash\nsleep 300 &\necho $! > {pid_file}\n```\n",
    )
    run_page(page, tmp_path / "run")
    status = Path(f"/proc/{int(pid_file.read_text())}/status")
    end = time.monotonic() + 10
    while status.exists() and "zombie" not in status.read_text() and time.monotonic() < end:
        time.sleep(0.05)  # SIGKILL is delivered asynchronously
    assert not status.exists() or "zombie" in status.read_text()


def test_replace_markers_apply_and_must_match(tmp_path: Path) -> None:
    page = _page(
        tmp_path,
        '<!-- docs-test: replace "sleep 300" with "sleep 0" -->\n```bash\nsleep 300\n```\n',
    )
    run_page(page, tmp_path / "run")
    stale = _page(
        tmp_path, '<!-- docs-test: replace "--orders 300" with "-n 3" -->\n```bash\nls\n```\n'
    )
    with pytest.raises(DocsError, match="marker replaces '--orders 300', which the block lacks"):
        run_page(stale, tmp_path / "run2")


def test_pages_get_the_markers_of_the_servers_they_use(tmp_path: Path) -> None:
    page = _page(
        tmp_path,
        "<!-- docs-test: needs postgres nats -->\n```bash\nsagakit worker &\n```\n\n"
        '```python\nURL = "amqp://guest:guest@127.0.0.1:5672/"\n```\n\n'
        "```text\npostgresql:// in output only\n```\n",
    )
    assert needs(parse(page)) == {"postgres", "nats", "rabbitmq"}
