"""Reports: every format appears, plots are real embedded PNGs, and the page renders in a browser."""

from __future__ import annotations

import base64
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from quantscope.report import (
    fmt_pm,
    markdown_table,
    pareto_front,
    render_html,
    render_markdown,
    write_report,
)

FORMATS = [  # (format, bits/weight, KLD mean, KLD stderr, decode tok/s)
    ("fp32", 32.0, 0.0, 0.0, 20.0),
    ("bf16", 16.0, 2.1e-5, 1.3e-6, 23.0),
    ("int8", 8.25, 3.2e-4, 2.1e-5, 26.0),
    ("int4-g128", 4.25, 0.031, 0.0021, 29.0),
    ("nf4", 4.5, 0.027, 0.0019, 31.5),
    ("int3-g128", 3.25, 0.151, 0.011, 33.0),
]


def _records() -> list[dict]:
    records = []
    for i, (fmt, bpw, kld, se, decode) in enumerate(FORMATS):
        records.append({
            "format": fmt, "model": "tiny", "text": "python-docs", "ctx": 64, "windows": 4, "tokens_scored": 252,
            "perplexity": 12.0 + 30 * kld, "perplexity_stderr": 0.4, "kld_mean": kld, "kld_stderr": se,
            "kld_p99": 8 * kld, "top1_agreement": 1 - 2 * kld, "weight_bytes": int(1e6 * bpw / 8),
            "bits_per_weight": bpw, "peak_rss_bytes": 3 << 28, "prefill_tokens_per_s": 400.0 - i,
            "decode_tokens_per_s": decode, "quantize_seconds": 0.1 * i, "baseline": i == 0,
            "quantscope_version": "0.1.0", "torch_version": "2.13.0", "transformers_version": "5.24",
            "text_sha256": "ab" * 32,
            "tasks": {
                "arc-easy": {"n": 200, "acc": 0.55 - kld, "acc_ci": [0.48 - kld, 0.62 - kld]},
                "piqa": {"n": 200, "acc": 0.66 - kld, "acc_ci": [0.59 - kld, 0.72 - kld],
                         **({} if i == 0 else {"delta": -kld, "delta_ci": [-kld - 0.02, -kld + 0.02]})},
            },
        })
    records.append({"format": "int2-g64", "model": "tiny", "text": "python-docs", "ctx": 64, "windows": 4,
                    "error": "needs | a <backend> that is not installed"})
    # Nothing measured and no error: every measurement field missing.
    records.append({"format": "fp8-e4m3", "model": "tiny", "text": "python-docs", "ctx": 64, "windows": 4})
    return records


def _meta() -> dict:
    return {
        "name": "demo-run", "created": "2026-01-02T03:04:05+00:00",
        "machine": {"platform": "Linux-test", "cpu_count": 2},
        "recommendation": [
            {"format": "int3-g128", "passed": False, "reason": "KLD upper bound 0.17 > 0.05", "kld_upper": 0.173},
            {"format": "int4-g128", "passed": True, "reason": "KLD upper bound 0.035 <= 0.05", "kld_upper": 0.0351},
        ],
        "sensitivity": [{"layer": f"model.layers.{i}.mlp.down_proj", "kld": 0.01 * (i % 5 + 1)} for i in range(8)],
    }


@pytest.fixture(scope="module")
def full_page() -> str:
    """The full report, rendered once (matplotlib takes a second or two per page)."""
    pytest.importorskip("matplotlib", reason="HTML plots need matplotlib: pip install 'quantscope[report]'")
    return render_html(_records(), _meta())


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_html_contains_every_format_and_embeds_real_images(full_page):
    records, page = _records(), full_page
    for r in records:
        assert f"<td>{r['format']}" in page, r["format"]
    images = re.findall(r'<img class="plot" alt="([^"]*)" src="data:image/png;base64,([^"]+)"', page)
    assert [alt.split(":")[0] for alt, _ in images] == ["quality vs size and speed", "task accuracy", "layer sensitivity"]
    for _, b64 in images:
        width, height = _png_size(base64.b64decode(b64))
        assert width > 200 and height > 100
    # Self-contained and escaped: no external resources, no scripts, user text cannot inject markup.
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<script" not in page
    assert "&lt;backend&gt;" in page and "<backend>" not in page
    # Recommendation trail, provenance.
    assert "KLD upper bound 0.035 &lt;= 0.05" in page and "passed" in page and "failed" in page
    assert "ab" * 32 in page and "Linux-test" in page and "2.13.0" in page


def test_records_of_different_evaluations_get_separate_tables():
    records = _records()[:2] + [{**r, "text": "wiki.test.raw"} for r in _records()[:2]]
    md = render_markdown(records, {})
    assert "### model tiny · text python-docs · ctx 64 · 4 windows" in md
    assert "### model tiny · text wiki.test.raw · ctx 64 · 4 windows" in md
    assert md.count("| fp32 (baseline) |") == 4  # comparison + task table, per group


def test_html_without_task_sensitivity_or_recommendation_has_only_the_pareto_plot():
    pytest.importorskip("matplotlib", reason="HTML plots need matplotlib: pip install 'quantscope[report]'")
    records = [{k: v for k, v in r.items() if k != "tasks"} for r in _records()]
    page = render_html(records, {"name": "plain"})
    assert page.count("<img") == 1
    assert "Recommendation" not in page and "sensitivity" not in page.lower()
    assert "No records yet" in render_html([], {})


def test_markdown_has_every_format_and_well_formed_tables():
    records, meta = _records(), _meta()
    md = render_markdown(records, meta)
    lines = md.splitlines()
    comparison = lines[lines.index("## Comparison") + 2:]
    comparison = comparison[:comparison.index("")]
    assert len(comparison) == 2 + len(records)
    cells = {len(re.findall(r"(?<!\\)\|", line)) for line in comparison}
    assert cells == {12}  # 11 columns; the '|' inside the error message is escaped
    for r in records:
        assert any(line.startswith(f"| {r['format']}") for line in comparison)
    assert "| fp32 (baseline) | 32.00 | 3.8 MiB | 12.00 ± 0.40 | 0 |" in md
    assert "| bf16 |" in md and "(2.10 ± 0.13)e-5" in md
    assert "skipped: needs \\| a <backend> that is not installed" in md
    assert "## Task accuracy" in md and "## Recommendation" in md and "## Layer sensitivity" in md
    assert "| 1 | model.layers.4.mlp.down_proj | 0.05 |" in md
    assert "## Provenance" in md and "sha256 " + "ab" * 32 in md


def test_number_formatting_rounds_to_the_standard_error():
    assert fmt_pm(12.34567, 0.02134) == "12.346 ± 0.021"
    assert fmt_pm(0.0313, 0.0021) == "0.0313 ± 0.0021"
    assert fmt_pm(2.1e-5, 1.3e-6) == "(2.10 ± 0.13)e-5"
    assert fmt_pm(153.2, 12.0) == "153 ± 12"
    assert fmt_pm(None, 0.1) == "—" and fmt_pm(float("inf"), None) == "inf"
    assert markdown_table(["a", "b"], [["x|y", "1"]]) == "| a | b |\n|---|---|\n| x\\|y | 1 |"


def test_pareto_front():
    bits = [32, 16, 8, 4.25, 4.5, 4.0]
    kld = [0.0, 1e-5, 3e-4, 0.031, 0.027, 0.05]
    assert pareto_front(bits, kld) == [5, 3, 4, 2, 1, 0]
    kld2 = [0.0, 1e-5, 3e-4, 0.031, 0.027, 0.02]  # 4.0 bits beats 4.25 and 4.5 on both axes
    assert pareto_front(bits, kld2) == [5, 2, 1, 0]
    speed = [20, 23, 26, 29, 32, 35]
    assert pareto_front(speed, [0.0, 1e-5, 3e-4, 0.031, 0.027, 0.15], maximize_x=True) == [5, 4, 2, 1, 0]


def test_write_report_replaces_files_atomically(tmp_path):
    md_path = tmp_path / "out" / "report.md"
    md_path.parent.mkdir()
    md_path.write_text("old content " * 1000)
    written = write_report(_records(), _meta(), md_path=md_path)
    assert written == [md_path]
    assert md_path.read_text() == render_markdown(_records(), _meta())
    assert sorted(p.name for p in md_path.parent.iterdir()) == ["report.md"]  # no temp files left


def _chromium(html_file: Path, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom", html_file.as_uri()],
        capture_output=True, text=True, timeout=120,
    )


def _console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


# Appended by the test only (the report itself has no script): after load, write each image's decoded
# size and laid-out size into the DOM, which --dump-dom then prints.
PROBE = """<script>
window.addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "qs-probe";
  out.textContent = JSON.stringify(Array.from(document.images).map(i => {
    const box = i.getBoundingClientRect();
    return {natural: [i.naturalWidth, i.naturalHeight], shown: [box.width, box.height], complete: i.complete};
  }));
  document.body.appendChild(out);
});
</script>"""


@pytest.mark.skipif(shutil.which("chromium") is None,
                    reason="headless browser test needs Debian's chromium: apt-get install -y chromium")
def test_html_renders_in_headless_chromium_with_visible_plots_and_no_console_errors(tmp_path, full_page):
    page = full_page
    report = tmp_path / "report.html"
    report.write_text(page)
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"))

    result = _chromium(probed, tmp_path / "profile")
    assert result.returncode == 0, result.stderr[-2000:]
    match = re.search(r'<pre id="qs-probe">(.*?)</pre>', result.stdout, re.S)
    assert match, "the probe did not run: page did not finish loading"
    images = json.loads(match.group(1))
    assert len(images) == 3
    for img in images:
        assert img["complete"] and min(img["natural"]) > 0 and min(img["shown"]) > 50, img
    assert _console_errors(result.stderr) == []

    # The console check must be able to fail: a page with a script error is caught.
    broken = tmp_path / "broken.html"
    broken.write_text(page.replace("</body>", '<script>throw new Error("deliberate")</script></body>'))
    caught = _console_errors(_chromium(broken, tmp_path / "profile2").stderr)
    assert any("Uncaught Error: deliberate" in line for line in caught)
