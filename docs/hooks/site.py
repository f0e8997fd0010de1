"""The mkdocs hook (mkdocs.yml `hooks:`): figures from results/, the settings and API references from the code,
and the files under results/ the pages show (screenshots, plots) added to the site."""

from __future__ import annotations

import json

import figures
import reference
import tables
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

# Files under results/ that pages link to as img/<name>.
IMAGES = ("page.png", "page-phone.png", "memory_scale.svg")
BLOCKS = {
    "settings-reference": reference.settings_markdown,
    "openapi-reference": lambda: reference.openapi_markdown(reference.openapi()),
}


def on_files(files: Files, config: MkDocsConfig) -> Files:
    for name in IMAGES:
        files.append(File.generated(config, f"img/{name}", abs_src_path=str(figures.RESULTS / name)))
    files.append(File.generated(config, "api/openapi.json", content=json.dumps(reference.openapi(), indent=1)))
    return files


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    try:
        return figures.expand(markdown, tables.TABLES, tables.COMMANDS, blocks=BLOCKS)
    except figures.FigureError as e:
        raise PluginError(f"{page.file.src_path}: {e}") from e
