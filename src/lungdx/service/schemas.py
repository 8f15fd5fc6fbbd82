"""Response models: they document the API in OpenAPI and keep responses free of patient data by construction."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ModelIdentity(BaseModel):
    name: str = Field(description="the algorithm's name, as DICOM SR and FHIR results give it")
    model: str = Field(description="registered model name")
    version: str = Field(description="fingerprint of architecture, weights, preprocessing and threshold")
    software_version: str
    task: str


class InputSummary(BaseModel):
    """Technical facts about the image; never names, IDs, dates or file names."""

    format: str
    rows: int
    columns: int
    bits: int | None = None
    modality: str | None = None
    body_part: str | None = None
    view_position: str | None = None
    photometric_interpretation: str | None = None


class Heatmap(BaseModel):
    """The heatmap overlay, or, when every method tried gives an empty map, the notice that says so instead."""

    method: str = Field(description="the method of the map shown (the last one tried when none is shown)")
    png: str | None = Field(None, description="RGBA PNG data URI on the preview's grid; alpha follows the heat; "
                                              "null when the map is empty")
    note: str = Field(description="what the method's map means")
    empty: bool = Field(False, description="the map of `method` is empty or near-empty (lungdx.explain.heatmap_problem), "
                                           "so no overlay is sent")
    fallback_from: str | None = Field(None, description="the service's configured method, when its map was empty and "
                                                        "`method` was tried instead; null otherwise")
    notice: str | None = Field(None, description="plain words to show where the overlay would be whenever a map "
                                                 "tried was empty; null when the configured method's map is shown")


class NoduleLocationOut(BaseModel):
    """Where a localising model (nodule_net) puts the nodule; absent for models that only classify."""

    x: float = Field(description="column of the nodule map's peak in the uploaded image's pixels")
    y: float = Field(description="row of the nodule map's peak in the uploaded image's pixels")
    radius: float = Field(description="radius in image pixels of the region the malignancy judge read")
    presence: float = Field(description="P(nodule present): the map at its peak")
    malignancy: float = Field(description="P(malignant | nodule): the judge's crop around the peak")
    lung_fraction: float = Field(description="share of the model input inside the segmented lung field")
    lung_ok: bool = Field(description="false when the lung segmentation failed: location and score unreliable")
    note: str


class Statement(BaseModel):
    """The result in words, as ``lungdx.wording.state_result`` gives it to every door (page, SR, SC, FHIR, CLI)."""

    probability: float
    threshold: float | None
    threshold_method: str | None
    decision: str | None = Field(description="class name at the threshold")
    near_threshold: bool = Field(description="the probability lies inside the threshold's 95% bootstrap interval on validation")
    band: list[float] | None = Field(description="that interval, [low, high]; null for checkpoints without one")
    headline: str
    threshold_text: str
    uncertainty_text: str
    alerts: list[str] = Field(description="monitoring alerts active when the result was made, in plain words")
    disclaimer: str


class ActiveAlert(BaseModel):
    check: str
    message: str = Field(description="one plain sentence")
    since: str | None = None


class PredictionOut(BaseModel):
    id: str | None = Field(description="prediction id for feedback; null when monitoring is off")
    probability: float
    label: str | None = Field(description="class name at the operating threshold")
    label_index: int | None
    threshold: float | None = Field(description="operating threshold, chosen on validation and frozen")
    threshold_method: str | None
    model: ModelIdentity
    warnings: list[str]
    input: InputSummary
    location: NoduleLocationOut | None = Field(None, description="the nodule map's peak (localising models only)")
    heatmap: Heatmap | None = None
    preview: str | None = Field(None, description="grayscale PNG data URI of the radiograph, for display")
    statement: Statement
    alerts: list[ActiveAlert] = Field(description="monitoring alerts (drift, performance) active at this moment")
    elapsed_ms: float
    not_for_clinical_use: str


class ModelCard(BaseModel):
    identity: ModelIdentity
    task: str
    class_names: list[str]
    threshold: float | None
    threshold_method: str | None
    temperature: float
    input_size_px: int
    preprocess: dict
    validation_metrics: dict | None
    test_metrics: dict | None = Field(description="Table 1 test metrics with confidence intervals, when the run was evaluated")
    training_data_fingerprint: str | None
    versions: dict
    intended_use: str
    not_for_clinical_use: str
    model_card_markdown: str | None = Field(description="the run's model card (from `lungdx report`), when present")


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    ready: bool
    model_version: str | None = None
    monitoring: bool = False


class FieldError(BaseModel):
    """One invalid part of a request, as request validation found it (never the value that was sent)."""

    model_config = ConfigDict(extra="forbid")

    loc: list[str | int] = Field(description="where: body, query, path or header, then the field name or position",
                                 examples=[["body", "file"]])
    msg: str = Field(description="what is wrong with it, for a person", examples=["Field required"])
    type: str = Field(description="the kind of error, for a program", examples=["missing"])


class ErrorOut(BaseModel):
    """The body of every error response, whatever the route and status (4xx and 5xx).

    ``detail`` and ``status`` mean what they mean in RFC 9457 (Problem Details for HTTP APIs), so a
    client that knows that format reads this one; ``detail`` stays a string, as in FastAPI's own
    ``HTTPException`` body, so ``response.json()["detail"]`` is the reason on every status.
    """

    model_config = ConfigDict(extra="forbid")

    detail: str = Field(description="why the request was refused, in one sentence a person can act on",
                        examples=["image of 13000 x 13000 pixels is over the limit of 50000000 pixels"])
    status: int = Field(description="the HTTP status code, repeated so that a logged body says it alone", examples=[413])
    errors: list[FieldError] | None = Field(description="one entry per invalid field when request validation failed "
                                                        "(422); null for every other error")


API_KEY_REFUSED = "missing or wrong API key in the X-API-Key header (only when the service has a key)"
INTERNAL_ERROR = "an internal error: never expected, a defect to report (the body says no more than this)"


def error_responses(descriptions: dict[int, str], *, html: bool = False) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses=``: each status with ``ErrorOut`` and what it means on this route, and 500 for every route.

    Args:
        html: the route answers text/html on success. FastAPI would declare a ``model`` under the
            route's own media type, so the errors name ``ErrorOut`` as application/json themselves
            (the component exists because every other route declares it through ``model``).
    """
    error = ({"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}} if html
             else {"model": ErrorOut})
    responses: dict[int | str, dict[str, Any]] = {
        status: {**error, "description": text} for status, text in {**descriptions, 500: INTERNAL_ERROR}.items()}
    if 401 in responses:  # RFC 9110 11.6.1: a 401 names the scheme to use
        responses[401]["headers"] = {"WWW-Authenticate": {"description": "the scheme: APIKey (header X-API-Key)",
                                                          "schema": {"type": "string"}}}
    return responses
