"""MkDocs hook: publish the benchmark charts that the performance page shows, from where the benchmarks write them.

`benchmarks/run.py` writes its charts to `benchmarks/results/`; copying them into `docs/` would leave two copies to
keep in step, so the site takes them from there, under the same path (`benchmarks/results/step_time.png`).
"""

from pathlib import Path

from mkdocs.structure.files import File

_ROOT = Path(__file__).resolve().parents[2]
_PUBLISHED = ("benchmarks/results/*.png",)


def on_files(files, config):
    for pattern in _PUBLISHED:
        for path in sorted(_ROOT.glob(pattern)):
            relative = path.relative_to(_ROOT).as_posix()
            files.append(File(relative, str(_ROOT), config["site_dir"], config["use_directory_urls"]))
    return files
