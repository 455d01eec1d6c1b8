"""`dvc plots show` without a network: DVC's HTML loads vega from a CDN, so its plots are blank
offline. This writes an HTML template with Vega, Vega-Lite and Vega-Embed inlined (bundled by
the vl-convert package, no download) and renders DVC's plots through it."""

from __future__ import annotations

import subprocess
from pathlib import Path

from freezecache.errors import FreezecacheError, optional
from freezecache.io import atomic_write_text

# Plots across stages, from the report's long tables (one row per method and x): the template
# .dvc/plots/by_method.json colours by the `method` column, so any set of methods draws.
# What needs vl-convert (the Vega bundle); the tables and `dvc plots show` (online) do not.
VL_CONVERT_NEEDED_FOR = (
    "`freezecache plots` and the sweep's SVG plot need it (`dvc plots show` does not, online)"
)

PLOTS = [
    {
        "validation_accuracy": {
            "template": "by_method",
            "x": "epoch",
            "y": {"${paths.results}/curves.csv": "val_acc"},
            "y_label": "validation accuracy, mean over seeds",
        }
    },
    {
        "memory_per_freezing_state": {
            "template": "by_method",
            "x": "epoch",
            "y": {"${paths.results}/memory.csv": "memory_mb"},
            "y_label": "accounted memory (MB)",
        }
    },
    {
        # one point per freeze point; `dvc plots diff` over a tolerance sweep overlays them
        "compression_vs_tolerance": {
            "template": "scatter",
            "x": "tolerance",
            "y": {"${paths.results}/cache.csv": "compression_ratio"},
        }
    },
]

PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>freezecache plots</title>
<script type="text/javascript">
{bundle}
</script>
<style>table {{ border-spacing: 15px; }}</style>
</head>
<body>
{{plot_divs}}
</body>
</html>
"""


def template() -> str:
    """The page, with the libraries inline (window.vegaEmbed is what DVC's divs call)."""
    vl_convert = optional("vl_convert", "vl-convert-python", why=VL_CONVERT_NEEDED_FOR)
    bundle = vl_convert.javascript_bundle().replace("</script", "<\\/script")
    return PAGE.format(bundle=bundle)


def render(out: Path) -> Path:
    """Writes out/index.html from `dvc plots show` through the offline template."""
    out.mkdir(parents=True, exist_ok=True)
    page = out / "template.html"
    atomic_write_text(page, template())
    done = subprocess.run(
        ["dvc", "plots", "show", "--html-template", str(page), "-o", str(out)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise FreezecacheError(f"dvc plots show failed: {done.stderr.strip()[-300:]}")
    return out / "index.html"
