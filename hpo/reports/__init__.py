"""Study reports: compute the data (`reports.data`), then draw it (`reports.render`)."""

from __future__ import annotations

from pathlib import Path

import optuna

from hpo.config import folder_name
from hpo.redact import recorded_uri
from hpo.reports.data import ReportData, report_data
from hpo.reports.render import render_html, render_markdown, to_json, write_pngs

__all__ = ["ReportData", "report_data", "write_report"]


def write_report(
    study: optuna.Study, out_dir: str | Path | None = None, tracking_uri: str | None = None
) -> Path:
    """Write index.html, report.md, its PNG figures and report.json; log them to the study's
    MLflow parent run. Returns the folder."""
    out = Path(out_dir or Path("reports") / folder_name(study.study_name))
    out.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri or recorded_uri(study.user_attrs.get("tracking_uri"))
    data = report_data(study, uri)
    images = write_pngs(study, data, out)
    (out / "report.md").write_text(render_markdown(data, images))
    (out / "report.json").write_text(to_json(data))
    # The page is written last and whole, so a half-written index.html is never left behind.
    tmp = out / "index.html.part"
    tmp.write_text(render_html(study, data))
    tmp.replace(out / "index.html")
    parent = study.user_attrs.get("mlflow_parent_run_id")
    if uri and parent:
        from hpo.tracking import log_folder

        log_folder(uri, parent, out, "report")
    return out
