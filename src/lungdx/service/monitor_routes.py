"""Monitoring routes: reader feedback, the monitoring report and its JSON summary.

Mounted by the app (``app.include_router(router)``); the monitor is ``app.state.monitor``, None when
the service runs without a database (then every route answers 503). Database work is synchronous,
so the routes are plain ``def`` and FastAPI runs them in its threadpool.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Query, Request, status
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field, StrictInt, StrictStr

from lungdx.service import schemas
from lungdx.service.security import require_api_key

MONITOR_OFF = "monitoring is disabled: the service runs without a database (lungdx serve --db URL)"
SINCE_INVALID = "an invalid ?since= period (use 30d, 12h, 90m, 2w or all)"
router = APIRouter(dependencies=[Depends(require_api_key)], tags=["monitoring"])


class FeedbackIn(BaseModel):
    """A reader's confirmed label for one prediction."""

    # Strict: in lax mode JSON true became 1 ("malignant") and 1.0 passed as 1, so a mistyped body stored a label.
    label: StrictStr | StrictInt = Field(description="a class name of the model (e.g. 'malignant') or the integer 0 or 1",
                                         examples=["malignant"])
    reader: StrictStr = Field(description="a short reader code with at least one digit, such as R1 or RAD-07, never a name",
                              examples=["R1"])


class FeedbackOut(BaseModel):
    """The stored feedback."""

    prediction_id: str
    label: int
    class_name: str
    reader: str
    created_at: str


def _monitor(request: Request):
    monitor = getattr(request.app.state, "monitor", None)
    if monitor is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            detail="monitoring is disabled: start the service with a database (lungdx serve --db URL)")
    return monitor


@router.post("/v1/predictions/{prediction_id}/feedback", response_model=FeedbackOut, responses=schemas.error_responses({
    400: "malformed request body (e.g. not UTF-8)", 401: schemas.API_KEY_REFUSED,
    404: "no prediction with this id in the monitoring log", 413: "request body over --max-upload-mb",
    422: "an invalid body, or a label that is not one of the model's classes",
    503: f"{MONITOR_OFF}; or the monitoring log is behind (Retry-After)"}))
def add_feedback(prediction_id: str, feedback: FeedbackIn, request: Request) -> dict:
    """Store a reader's confirmed label beside the logged prediction."""
    from lungdx.monitoring import UnknownPrediction

    monitor = _monitor(request)
    try:
        return monitor.add_feedback(prediction_id, feedback.label, feedback.reader)
    except UnknownPrediction as err:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"{err}; feedback needs the id a prediction returned") from err
    except ValueError as err:
        raise HTTPException(422, detail=str(err)) from err


def _since(since: str) -> str:
    from lungdx.monitoring import parse_since

    try:
        parse_since(since)
    except ValueError as err:
        raise HTTPException(422, detail=str(err)) from err
    return since


@router.get("/v1/monitor/report", response_class=HTMLResponse, responses=schemas.error_responses({
    401: schemas.API_KEY_REFUSED, 422: SINCE_INVALID, 503: MONITOR_OFF}, html=True))
def monitor_report(request: Request, since: str = Query("30d", description="period: 30d, 12h, 90m, 2w or all")) -> HTMLResponse:
    """The offline HTML monitoring report (volume, alerts, drift, rolling performance)."""
    from lungdx.monitoring import render_report

    return HTMLResponse(render_report(_monitor(request), since=_since(since)))


@router.get("/v1/monitor/summary", responses=schemas.error_responses({
    401: schemas.API_KEY_REFUSED, 422: SINCE_INVALID, 503: MONITOR_OFF}))
def monitor_summary(request: Request, since: str = Query("30d", description="period: 30d, 12h, 90m, 2w or all")) -> dict:
    """Volume, drift checks, alerts and rolling performance as JSON."""
    return _monitor(request).summary(since=_since(since))
