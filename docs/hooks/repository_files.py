"""MkDocs hook: publish the repository files that the pages link to outside docs/ (benchmark charts and result
tables, configs), so that the site shows them and `mkdocs build --strict` checks every such link.

A page links such a file as the repository lays it out (`../benchmarks/results/quality/quality.png` from
docs/quality.md), which is what GitHub's view of docs/ resolves and where the benchmarks write it: copying it into
docs/ would leave two copies to keep in step, and a regenerated chart would go stale on the site. Instead the hook
publishes each linked file under its repository path (`benchmarks/results/quality/quality.png` in the site) and
rewrites the link on the page to that path. A linked Markdown file becomes a page of the site; any other file is
copied as it is. A link to a file that does not exist is left alone, for the strict build to report.
"""

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

_ROOT = Path(__file__).resolve().parents[2]
# A Markdown link or image whose target leaves docs/: ](../path) or ](../path#anchor), with an optional title.
_OUTSIDE_LINK = re.compile(r"(\]\()(\.\./[^)\s#]+)")


def _repository_path(page_source: str, target: str, docs_dir: Path):
    """The repository-relative path of ``target`` linked from ``page_source`` (relative to docs/), when it is a
    file of the repository outside docs/; else None."""
    resolved = (docs_dir / posixpath.dirname(page_source) / target).resolve()
    if not resolved.is_file() or docs_dir in resolved.parents or _ROOT not in resolved.parents:
        return None
    return resolved.relative_to(_ROOT).as_posix()


def _linked_files(docs_dir: Path):
    found = set()
    for page in docs_dir.rglob("*.md"):
        source = page.relative_to(docs_dir).as_posix()
        for _, target in _OUTSIDE_LINK.findall(page.read_text(encoding="utf-8")):
            path = _repository_path(source, target, docs_dir)
            if path:
                found.add(path)
    return sorted(found)


def on_files(files, config):
    docs_dir = Path(config["docs_dir"]).resolve()
    for path in _linked_files(docs_dir):
        if files.get_file_from_path(path) is None:
            files.append(File(path, str(_ROOT), config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_markdown(markdown, page, config, files):
    docs_dir = Path(config["docs_dir"]).resolve()
    source = page.file.src_uri

    def published(match):
        path = _repository_path(source, match.group(2), docs_dir)
        if path is None:
            return match.group(0)
        return match.group(1) + posixpath.relpath(path, posixpath.dirname(source) or ".")

    return _OUTSIDE_LINK.sub(published, markdown)
