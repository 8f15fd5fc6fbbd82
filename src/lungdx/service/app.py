"""The FastAPI app: ``create_app(settings)``.

The model loads once, in the lifespan, into a ``Services`` object that routes reach through the
``services`` dependency; the same ``Predictor`` as the command line does all preprocessing.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import cv2
import numpy as np
from fastapi import Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from lungdx import __version__
from lungdx.io.acceptance import AcceptancePolicy
from lungdx.predict import Prediction, Predictor
from lungdx.preprocess import window
from lungdx.report import NOT_FOR_CLINICAL_USE
from lungdx.service import schemas
from lungdx.service.batching import Busy, DecodePool, MicroBatcher
from lungdx.service.errors import error_response, install_error_handlers
from lungdx.service.inputs import UploadRejected, case_hash, read_upload
from lungdx.service.security import require_api_key
from lungdx.service.settings import ServiceSettings
from lungdx.wording import state_result

logger = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")
HEATMAP_NOTES = {
    "gradcam": "Grad-CAM: where the last convolutional layer's evidence for the positive class lies.",
    "gradcampp": "Grad-CAM++: Grad-CAM with weights that let several separate regions show, not only the strongest.",
    "occlusion": "Occlusion: how much the probability drops when each patch is hidden.",
    "nodule_map": ("The model's own nodule map: P(nodule) per 4-pixel cell inside the segmented lungs, the output it "
                   "was trained to give around each nodule (not Grad-CAM; ?heatmap with --heatmap-method gradcam for that)."),
}
LOCATION_NOTE = ("The nodule map's peak: the most suspicious point in the lungs, in the image's pixels (x: column, y: row). "
                 "It is shown whatever the decision; on a 'normal' result it is the least unlikely place, not a finding.")
HEATMAP_CAVEAT = (" Not a segmentation of a nodule: on JSRT the heatmap's peak lands in the nodule no more "
                  "often than chance (docs/results.md).")
PREDICTION_ERRORS = {
    400: "malformed multipart/form-data body",
    401: schemas.API_KEY_REFUSED,
    413: "request body over --max-upload-mb, or an image over --max-megapixels (rows x columns from its header, "
         "before decoding: the reason gives the size)",
    415: "not a PNG, a JPEG or a DICOM (PS3.10) file, judged by its first bytes",
    422: "no 'file' part or more than one, an invalid query parameter, an empty or undecodable file, or an image the "
         "acceptance policy refuses (the reason says which check)",
    503: "the model is not loaded yet; the service is busy (every decoding slot taken for --decode-wait-s, or "
         "--max-queue images waiting for the model; Retry-After); or the monitoring log is behind (its database "
         "takes no writes; Retry-After)",
}
INTENDED_USE = ("Research on computer-aided detection of lung nodules in frontal (PA/AP) chest radiographs "
                "of adults; a second look beside a radiologist's own reading, never instead of it.")


@dataclass
class Services:
    """What the lifespan builds and the routes use."""

    settings: ServiceSettings
    predictor: Predictor
    identity: dict
    card: dict
    batcher: MicroBatcher
    model_lock: threading.Lock
    decoders: DecodePool
    monitor: object | None = None


def services(request: Request) -> Services:
    """Dependency: the loaded model and friends; 503 until the lifespan has finished loading them."""
    loaded = getattr(request.app.state, "services", None)
    if loaded is None:
        raise HTTPException(503, detail="the model is not loaded yet")
    return loaded


async def one_file_part(request: Request) -> None:
    """Dependency: 422 for a body with more than one ``file`` part, which would otherwise let the last one win."""
    count = len((await request.form()).getlist("file"))  # the form FastAPI has already parsed, not a second parse
    if count > 1:
        raise RequestValidationError([{"type": "too_many_parts", "loc": ("body", "file"),
                                       "msg": f"{count} parts named 'file': send exactly one image per request"}])


def create_app(settings: ServiceSettings) -> FastAPI:
    """The service for one model. Nothing is loaded until the app starts (uvicorn or ``TestClient``)."""
    from fastapi_offline import FastAPIOffline

    # FastAPIOffline: a FastAPI whose /docs and /redoc pages load Swagger UI and ReDoc from the
    # package, not from a CDN, so they work in a hospital network without internet.
    # max_body_size: FastAPI answers 413 by Content-Length or as soon as a streamed body passes it.
    app = FastAPIOffline(title="lungdx", version=__version__, lifespan=_lifespan, max_body_size=settings.max_upload_bytes,
                         description="Lung nodule assessment of chest radiographs. " + NOT_FOR_CLINICAL_USE)
    install_error_handlers(app, monitoring=bool(settings.db_url))  # one error body, schemas.ErrorOut, for every route
    app.add_exception_handler(Busy, _busy)  # from the decoding pool or the model's queue, wherever a route meets it
    app.state.settings = settings
    app.state.services = None
    app.state.monitor = None
    app.state.registry = CollectorRegistry()
    app.state.batch_sizes = Histogram("lungdx_batch_size", "images per forward pass", buckets=(1, 2, 4, 8, 16, 32, 64),
                                      registry=app.state.registry)
    _add_request_metrics(app)
    _add_routes(app)
    from lungdx.service.monitor_routes import router as monitor_router

    app.include_router(monitor_router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    settings: ServiceSettings = app.state.settings
    policy = AcceptancePolicy(max_pixels=settings.max_pixels, allow_non_chest=settings.allow_non_chest)
    predictor = await run_in_threadpool(Predictor.from_path, settings.run, device=settings.device,
                                        precision=settings.precision, policy=policy)
    lock = threading.Lock()

    def run_batch(items: list[tuple[np.ndarray, tuple[int, int]]]) -> list[tuple[float, object]]:
        """(levelled, original shape) -> (probability, NoduleLocation or None), one batch through the model."""
        with lock:
            probabilities, locations = predictor.score(np.stack([image for image, _ in items]),
                                                       [shape for _, shape in items], batch_size=len(items))
        return [(float(p), location) for p, location in zip(probabilities, locations, strict=True)]

    batcher = MicroBatcher(run_batch, settings.max_batch, settings.max_wait_ms / 1000, on_batch=app.state.batch_sizes.observe,
                           max_queue=settings.max_queue)
    monitor = await run_in_threadpool(_open_monitor, settings, predictor.checkpoint, app.state.registry)
    app.state.monitor = monitor
    await batcher.start()
    decoders = DecodePool(settings.max_decodes, settings.decode_wait_s)
    app.state.services = Services(settings, predictor, predictor.identity,
                                  _model_card(settings.run, predictor), batcher, lock, decoders, monitor)
    logger.info("serving %s version %s in %s (monitoring %s, batches of up to %d, %d decoding at once)",
                app.state.services.identity["name"], app.state.services.identity["version"], predictor.hardware.precision,
                "on" if monitor else "off", settings.max_batch, settings.max_decodes)
    try:
        yield
    finally:
        app.state.services = None
        await batcher.stop()
        decoders.close()
        if monitor is not None:
            monitor.close()


def _open_monitor(settings: ServiceSettings, checkpoint: dict, registry: CollectorRegistry):
    if not settings.db_url:
        return None
    from lungdx.monitoring import Monitor, MonitorSettings

    run_dir = settings.run if Path(settings.run).is_dir() else None
    options = MonitorSettings(archive_dir=settings.archive_dir, webhook_url=settings.webhook_url)
    return Monitor.open(settings.db_url, checkpoint, registry=registry, settings=options, run_dir=run_dir)


def _add_request_metrics(app: FastAPI) -> None:
    requests = Counter("lungdx_requests", "HTTP requests by route and status", ["route", "status"], registry=app.state.registry)
    latency = Histogram("lungdx_request_seconds", "time to answer a request, by route", ["route"],
                        buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10), registry=app.state.registry)

    @app.middleware("http")
    async def count(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")  # the template: no ids in labels
        requests.labels(route, str(response.status_code)).inc()
        latency.labels(route).observe(time.perf_counter() - start)
        return response


def _add_routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():  # where browsers and bookmarks look by default; the page itself links the same file
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    @app.get("/healthz", response_model=schemas.Health, summary="the process answers", responses=schemas.error_responses({}))
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", response_model=schemas.Ready, summary="the model is loaded and the batcher runs",
             responses=schemas.error_responses({503: "not ready: the model is still loading, or the batcher has stopped"}))
    async def readyz(request: Request):
        loaded: Services | None = request.app.state.services
        if loaded is None or not loaded.batcher.running:
            raise HTTPException(503, detail="not ready: the model is not loaded or the batcher is not running")
        return {"ready": True, "model_version": loaded.identity["version"], "monitoring": loaded.monitor is not None}

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request):  # not async: the monitoring gauges query the database, off the event loop
        return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/model", response_model=schemas.ModelCard, dependencies=[Depends(require_api_key)],
             summary="the model card: identity, threshold, validation and test figures, intended use",
             responses=schemas.error_responses({401: schemas.API_KEY_REFUSED, 503: "the model is not loaded yet"}))
    async def model(loaded: Annotated[Services, Depends(services)]):
        return loaded.card

    @app.post("/v1/predictions", response_model=schemas.PredictionOut,
              dependencies=[Depends(require_api_key), Depends(one_file_part)],
              summary="probability, label at the operating threshold and, on request, a heatmap",
              responses=schemas.error_responses(PREDICTION_ERRORS))
    async def predict(file: Annotated[UploadFile, File(description="a PNG, JPEG or DICOM chest radiograph")],
                      loaded: Annotated[Services, Depends(services)],
                      heatmap: Annotated[bool, Query(description="add a heatmap (slower)")] = False,
                      preview: Annotated[bool, Query(description="add a grayscale preview of the radiograph")] = False):
        return await _predict(loaded, file, heatmap, preview)


async def _predict(loaded: Services, file: UploadFile, want_heatmap: bool, want_preview: bool) -> dict:
    start = time.perf_counter()
    try:
        # Decoding and levelling in the pool of their own, not FastAPI's: a burst of large images waits for a
        # slot (or gets 503) instead of taking the memory and the threads that feedback and /metrics need.
        radiograph, levelled = await loaded.decoders.run(_read_and_level, loaded.predictor, file.file)
    except UploadRejected as err:
        logger.info("rejected upload (%d): %s", err.status, err.reason)
        raise HTTPException(err.status, detail=err.reason) from err
    except ValueError as err:  # levelling refuses degenerate images
        raise HTTPException(422, detail=f"cannot prepare the image: {err}") from err
    probability, location = await loaded.batcher.submit((levelled, radiograph.pixels.shape[:2]))
    prediction = loaded.predictor.decide("upload", probability, radiograph.meta, location)
    shape = _preview_shape(radiograph.pixels.shape, loaded.settings.preview_px)
    heatmap = await run_in_threadpool(_heatmap, loaded, levelled, radiograph.pixels.shape, shape) if want_heatmap else None
    preview = await run_in_threadpool(_preview_png, radiograph.pixels, shape) if want_preview else None
    prediction_id = None
    if loaded.monitor is not None:
        prediction_id = await run_in_threadpool(loaded.monitor.record, prediction, radiograph.pixels)
    elapsed_ms = (time.perf_counter() - start) * 1000
    logger.info("prediction %s case %s: p=%.4f %s in %.0f ms", prediction_id or "-", case_hash(radiograph.meta),
                probability, prediction.class_name, elapsed_ms)
    return _prediction_body(loaded, prediction_id, prediction, heatmap, preview, elapsed_ms)


async def _busy(request: Request, err: Busy) -> Response:
    """503 with Retry-After: a temporary state, like the monitoring log's (errors.LOG_BEHIND)."""
    retry_after_s = max(1, math.ceil(request.app.state.settings.decode_wait_s))
    logger.warning("answered 503: %s", err)
    return error_response(503, f"the service is busy: {err}; retry in {retry_after_s} s",
                          headers={"Retry-After": str(retry_after_s)})


def _read_and_level(predictor: Predictor, stream) -> tuple:
    """(Radiograph, levelled image) of one upload: the decoding pool's job."""
    radiograph = read_upload(stream, predictor.policy)
    return radiograph, predictor.level(radiograph.pixels)


def _prediction_body(loaded: Services, prediction_id, prediction: Prediction, heatmap, preview, elapsed_ms) -> dict:
    meta = prediction.meta
    alerts = loaded.monitor.active_alerts() if loaded.monitor is not None else []
    statement = state_result(prediction.probability, loaded.predictor.checkpoint, [alert["message"] for alert in alerts])
    rows, columns = meta.get("original_shape") or (0, 0)
    return {"id": prediction_id, "probability": prediction.probability, "label": prediction.class_name,
            "label_index": prediction.label, "threshold": prediction.threshold,
            "threshold_method": loaded.predictor.checkpoint.get("threshold_method"), "model": loaded.identity,
            "warnings": prediction.warnings,
            "input": {"format": meta.get("format", "unknown"), "rows": rows, "columns": columns, "bits": meta.get("bits"),
                      **{key: meta.get(key) for key in ("modality", "body_part", "view_position", "photometric_interpretation")}},
            "location": _location_body(prediction.location), "heatmap": heatmap, "preview": preview,
            "statement": statement.as_dict(), "alerts": [{key: alert.get(key) for key in ("check", "message", "since")}
                                                         for alert in alerts],
            "elapsed_ms": round(elapsed_ms, 1),
            "not_for_clinical_use": NOT_FOR_CLINICAL_USE}


def _location_body(location: dict | None) -> dict | None:
    if location is None:
        return None
    return {key: location[key] for key in ("x", "y", "radius", "presence", "malignancy", "lung_fraction", "lung_ok")} | {
        "note": LOCATION_NOTE}


def _preview_shape(shape: tuple[int, int], longest: int) -> tuple[int, int]:
    scale = min(1.0, longest / max(shape))
    return max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))


def _png_data_uri(array: np.ndarray) -> str:
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return "data:image/png;base64," + base64.b64encode(encoded.tobytes()).decode("ascii")


def _preview_png(pixels: np.ndarray, shape: tuple[int, int]) -> str:
    """The radiograph for display: a 0.5-99.5 percentile window, resized by area averaging."""
    small = cv2.resize(pixels, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
    return _png_data_uri(np.round(window(small, 0.5, 99.5) * 255).astype(np.uint8))


def _heatmap(loaded: Services, levelled: np.ndarray, original: tuple[int, int], shape: tuple[int, int]) -> dict:
    """The configured method's heatmap on the preview's grid; when its map is empty, one fallback's, saying so.

    Empty is ``explain.heatmap_problem`` of the map as the page would draw it (``explain.choose_heatmap``).
    When the fallback's map is empty too, the body carries the notice and no overlay: a transparent PNG
    would pass for a map.
    """
    from lungdx.explain import choose_heatmap, resolve_method

    model = loaded.predictor.model
    chosen = choose_heatmap(lambda method: _heat_on_preview(loaded, levelled, original, shape, method),
                            resolve_method(loaded.settings.heatmap_method, model), model)
    png = None
    if chosen.problem is None:
        heat = chosen.heatmap
        colours = cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), cv2.COLORMAP_JET)  # BGR, as imencode wants
        png = _png_data_uri(np.dstack([colours, np.round(heat * 255).astype(np.uint8)]))  # alpha: the heat
    caveat = "" if chosen.method == "nodule_map" else HEATMAP_CAVEAT
    return {"method": chosen.method, "png": png, "note": HEATMAP_NOTES[chosen.method] + caveat,
            "empty": chosen.problem is not None, "fallback_from": chosen.requested if chosen.fallback else None,
            "notice": chosen.notice}


def _heat_on_preview(loaded: Services, levelled: np.ndarray, original: tuple[int, int], shape: tuple[int, int],
                     method: str) -> np.ndarray:
    """One method's heatmap mapped onto the uploaded image and resized to the preview: (rows, columns) in [0, 1]."""
    from lungdx.explain import explain_levelled, to_original_grid

    with loaded.model_lock:
        heat = explain_levelled(loaded.predictor, levelled[None], method)[0]
    on_image = to_original_grid(heat, original, loaded.predictor.preprocess_config)
    return np.clip(cv2.resize(on_image, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)


def _model_card(run: Path, predictor: Predictor) -> dict:
    checkpoint = predictor.checkpoint
    run = Path(run)
    run_dir = run if run.is_dir() else run.parent
    table = run_dir / "evaluation" / "table1.json"
    test_metrics = json.loads(table.read_text()).get("splits", {}).get("test") if table.is_file() else None
    card_file = run_dir / "report" / "model_card.md"
    return {"identity": predictor.identity, "task": checkpoint.get("task", ""),
            "class_names": list(checkpoint["class_names"]), "threshold": checkpoint.get("threshold"),
            "threshold_method": checkpoint.get("threshold_method"), "temperature": predictor.temperature,
            "input_size_px": predictor.preprocess_config.size, "preprocess": dict(checkpoint["preprocess"]),
            "validation_metrics": checkpoint.get("val_metrics"), "test_metrics": test_metrics,
            "training_data_fingerprint": checkpoint.get("data_fingerprint"), "versions": dict(checkpoint.get("versions", {})),
            "intended_use": INTENDED_USE, "not_for_clinical_use": NOT_FOR_CLINICAL_USE,
            "model_card_markdown": card_file.read_text() if card_file.is_file() else None}
