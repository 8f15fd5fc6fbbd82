"""The service's contract: every answer is declared in its OpenAPI schema, and every error has one shape.

schemathesis generates requests from the schema (multipart uploads included) and checks each answer
against it; a table of hand-made requests reaches the answers random bytes do not (200, 401, 404,
413, 503, a 500) and holds each to the same checks. Everything runs in-process: no network.
"""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the service tests need the serve extra (pip install -e '.[serve]')")
pytest.importorskip("httpx2", reason="the TestClient needs httpx2 (the test extra)")
schemathesis = pytest.importorskip("schemathesis", reason="the schema test needs schemathesis (the test extra)")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from test_service import write_dicom  # noqa: E402

from lungdx.service import schemas  # noqa: E402
from lungdx.service.app import create_app  # noqa: E402
from lungdx.service.settings import ServiceSettings  # noqa: E402

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]
KEY = "schema-test-key-0123456789"
MAX_UPLOAD_BYTES = 256 * 1024
MAX_PIXELS = 10_000_000
ERROR_REF = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}
# Every status each operation declares besides 200: the contract the page and other clients rely on.
DECLARED = {
    ("get", "/healthz"): {500},
    ("get", "/readyz"): {500, 503},
    ("get", "/v1/model"): {401, 500, 503},
    ("post", "/v1/predictions"): {400, 401, 413, 415, 422, 500, 503},
    ("post", "/v1/predictions/{prediction_id}/feedback"): {400, 401, 404, 413, 422, 500, 503},
    ("get", "/v1/monitor/report"): {401, 422, 500, 503},
    ("get", "/v1/monitor/summary"): {401, 422, 500, 503},
}


def settings_for(trained_run, folder, **overrides) -> ServiceSettings:
    options = dict(db_url=f"sqlite:///{folder / 'monitor.db'}", max_upload_bytes=MAX_UPLOAD_BYTES, max_pixels=MAX_PIXELS)
    return ServiceSettings(run=trained_run, **(options | overrides))


@pytest.fixture(scope="module")
def api_schema(trained_run, tmp_path_factory):
    """The schema as the app serves it, bound to the app itself: schemathesis calls it in-process."""
    from schemathesis.python.asgi import shutdown_lifespans

    app = create_app(settings_for(trained_run, tmp_path_factory.mktemp("schemathesis")))
    config = schemathesis.Config.from_dict({"generation": {"deterministic": True}})
    yield schemathesis.openapi.from_asgi("/openapi.json", app, config=config)
    shutdown_lifespans()  # schemathesis started the lifespan; the model and the database close here


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture])
def test_generated_requests_get_declared_answers(case):
    case.call_and_validate(checks=CHECKS)


# ---- the answers generated requests do not reach ------------------------------------------------


@pytest.fixture(scope="module")
def clients(trained_run, tmp_path_factory):
    """name -> TestClient: open (monitoring on), keyed, unstarted (no lifespan) and without monitoring."""
    folder = tmp_path_factory.mktemp("contract")
    unstarted = TestClient(create_app(settings_for(trained_run, folder)))
    with (TestClient(create_app(settings_for(trained_run, folder))) as open_client,
          TestClient(create_app(settings_for(trained_run, folder, api_key=KEY))) as keyed,
          TestClient(create_app(settings_for(trained_run, folder, db_url=None))) as no_monitor):
        yield {"open": open_client, "keyed": keyed, "unstarted": unstarted, "no_monitor": no_monitor}


@pytest.fixture(scope="module")
def openapi(clients) -> dict:
    return clients["open"].get("/openapi.json").json()


@pytest.fixture(scope="module")
def contract(openapi):
    return schemathesis.openapi.from_dict(openapi)


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(rows: int, columns: int, folder=None) -> bytes:
    """A PNG whose header declares rows x columns and whose data holds a few bytes: a decompression bomb's shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", columns, rows, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_header_only(rows: int, columns: int, folder=None) -> bytes:
    """A 16 x 16 JPEG whose SOF0 segment is rewritten to declare rows x columns."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    sof = data.index(b"\xff\xc0")  # ITU-T T.81 B.2.2: marker, length (2), precision (1), lines, samples per line
    data[sof + 5:sof + 9] = struct.pack(">HH", rows, columns)
    return bytes(data)


def dicom_header_only(rows: int, columns: int, folder) -> bytes:
    """A CR chest DICOM whose Rows (0028,0010) x Columns (0028,0011) is huge and whose PixelData is 16 x 16."""
    path = folder / f"declared-{rows}x{columns}.dcm"
    ds = write_dicom(path, np.zeros((16, 16)))
    ds.Rows, ds.Columns = rows, columns
    ds.save_as(path, enforce_file_format=True)
    return path.read_bytes()


def upload(content: bytes, name: str = "file") -> dict:
    return {"files": [(name, ("image", content))]}


def streamed_body():
    """A multipart body with no Content-Length that passes the limit while it streams in."""
    yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
    for _ in range(MAX_UPLOAD_BYTES // 1024 + 8):
        yield b"\0" * 1024


def checked(response) -> "schemathesis.Response":
    """A TestClient response as schemathesis checks it; the request without its body (a streamed one is gone)."""
    import requests

    request = requests.Request(method=response.request.method, url=str(response.request.url),
                               headers=dict(response.request.headers)).prepare()
    return schemathesis.Response(status_code=response.status_code, headers={key: [value] for key, value in response.headers.items()},
                                 content=response.content, request=request, elapsed=response.elapsed.total_seconds(),
                                 message=response.reason_phrase, encoding=response.encoding,
                                 http_version=response.http_version, verify=True)


def assert_declared(contract, method: str, template: str, response) -> dict:
    """The answer conforms to what the operation declares for its status; an error has the one error shape.

    A 503 (not loaded, monitoring off) and the deliberate 500 are meant here: every check but not_a_server_error.
    """
    checks = CHECKS if response.status_code < 500 else CHECKS[1:]
    parameters = {"prediction_id": "nope"} if "{prediction_id}" in template else None
    contract[template][method.upper()].Case(path_parameters=parameters).validate_response(checked(response), checks=checks)
    body = response.json()
    if response.status_code >= 400:
        error = schemas.ErrorOut.model_validate(body)  # extra="forbid": no other member either
        assert error.status == response.status_code and error.detail
        assert (error.errors is not None) == (response.status_code == 422 and "invalid request" in error.detail)
    return body


def test_every_error_status_is_declared_with_the_one_error_shape(openapi):
    assert "HTTPValidationError" not in openapi["components"]["schemas"]  # FastAPI's own 422 shape is gone
    operations = {(method, path): operation for path, item in openapi["paths"].items() for method, operation in item.items()}
    assert set(operations) == set(DECLARED)
    for key, operation in operations.items():
        statuses = {int(status) for status in operation["responses"]}
        assert statuses == DECLARED[key] | {200}, key
        for status in DECLARED[key]:
            assert operation["responses"][str(status)]["content"] == ERROR_REF, (key, status)
    assert set(operations[("get", "/v1/model")]["responses"]["401"]["headers"]) == {"WWW-Authenticate"}


CASES = [  # (client, method, path, template, request, status, words in the reason)
    ("open", "post", "/v1/predictions", None, "two file parts", 422, "2 parts named 'file'"),
    ("open", "post", "/v1/predictions", None, "no file part", 422, "body.file: Field required"),
    ("open", "post", "/v1/predictions?heatmap=maybe", None, "png", 422, "query.heatmap"),
    ("open", "post", "/v1/predictions", None, "broken multipart", 400, "malformed request body"),
    ("open", "post", "/v1/predictions", None, "text", 415, "unsupported file type"),
    ("open", "post", "/v1/predictions", None, "empty", 422, "empty"),
    ("open", "post", "/v1/predictions", None, "over the byte limit", 413, f"over the limit of {MAX_UPLOAD_BYTES} bytes"),
    ("open", "post", "/v1/predictions", None, "streamed over the byte limit", 413, f"over the limit of {MAX_UPLOAD_BYTES} bytes"),
    ("open", "post", "/v1/predictions/nope/feedback", "/v1/predictions/{prediction_id}/feedback", "feedback", 404,
     "no prediction with id 'nope'"),
    ("open", "post", "/v1/predictions/nope/feedback", "/v1/predictions/{prediction_id}/feedback", "not json", 422,
     "JSON decode error"),
    ("open", "get", "/v1/monitor/summary?since=fortnight", None, None, 422, "cannot read the period"),
    ("open", "get", "/v1/monitor/report?since=fortnight", None, None, 422, "cannot read the period"),
    ("keyed", "get", "/v1/model", None, None, 401, "X-API-Key"),
    ("keyed", "post", "/v1/predictions", None, "two file parts", 401, "X-API-Key"),
    ("keyed", "post", "/v1/predictions/nope/feedback", "/v1/predictions/{prediction_id}/feedback", "feedback", 401, "X-API-Key"),
    ("keyed", "get", "/v1/monitor/report", None, None, 401, "X-API-Key"),
    ("unstarted", "get", "/readyz", None, None, 503, "not ready"),
    ("unstarted", "get", "/v1/model", None, None, 503, "not loaded"),
    ("unstarted", "post", "/v1/predictions", None, "png", 503, "not loaded"),
    ("no_monitor", "get", "/v1/monitor/summary", None, None, 503, "monitoring is disabled"),
    ("no_monitor", "post", "/v1/predictions/nope/feedback", "/v1/predictions/{prediction_id}/feedback", "feedback", 503,
     "monitoring is disabled"),
    ("open", "post", "/v1/predictions?preview=true", None, "png", 200, None),
    ("open", "post", "/v1/predictions", None, "dicom", 200, None),
]


def request_kwargs(kind: str | None, phantom_png: bytes, tmp_path) -> dict:
    if kind is None:
        return {}
    bodies = {
        "png": lambda: upload(phantom_png),
        "dicom": lambda: upload(_phantom_dicom(phantom_png, tmp_path)),
        "two file parts": lambda: {"files": [("file", ("a.png", phantom_png)), ("file", ("b.png", phantom_png))]},
        "no file part": lambda: upload(phantom_png, name="image"),
        "broken multipart": lambda: {"content": b"--x\r\nnot a part", "headers": {"content-type": "multipart/form-data; boundary=x"}},
        "text": lambda: upload(b"patient list\n" * 40),
        "empty": lambda: upload(b""),
        "over the byte limit": lambda: upload(b"\0" * (MAX_UPLOAD_BYTES + 1)),
        "streamed over the byte limit": lambda: {"content": streamed_body(),
                                                 "headers": {"content-type": "multipart/form-data; boundary=x"}},
        "feedback": lambda: {"json": {"label": "malignant", "reader": "R1"}},
        "not json": lambda: {"content": b"{label: 1", "headers": {"content-type": "application/json"}},
    }
    return bodies[kind]()


def _phantom_dicom(phantom_png: bytes, folder) -> bytes:
    pixels = np.asarray(Image.open(io.BytesIO(phantom_png)), dtype=np.float32)
    write_dicom(folder / "chest.dcm", pixels / pixels.max())
    return (folder / "chest.dcm").read_bytes()


@pytest.fixture(scope="module")
def phantom_png(phantom_dir) -> bytes:
    return sorted((phantom_dir / "images").glob("*.png"))[0].read_bytes()


@pytest.mark.parametrize("name, method, path, template, kind, status, reason", CASES,
                         ids=[f"{case[0]}-{case[5]}-{case[4] or case[2]}" for case in CASES])
def test_each_answer_is_declared(clients, contract, phantom_png, tmp_path, name, method, path, template, kind, status, reason):
    response = clients[name].request(method, path, **request_kwargs(kind, phantom_png, tmp_path))
    assert response.status_code == status, response.text
    body = assert_declared(contract, method, template or path.split("?")[0], response)
    if reason is not None:
        assert reason in body["detail"]
    if status == 401:
        assert response.headers["WWW-Authenticate"] == "APIKey"


HEADER_ONLY = {"png": png_header_only, "jpeg": jpeg_header_only, "dicom": dicom_header_only}


@pytest.mark.parametrize("kind, rows, columns", [
    ("png", 4000, 4000), ("jpeg", 4000, 4000), ("dicom", 4000, 4000), ("dicom", 65535, 65535),
    ("png", 65000, 65000), ("jpeg", 65000, 65000),
])
def test_a_declared_pixel_count_over_the_limit_is_413_with_the_size(clients, contract, tmp_path, kind, rows, columns):
    content = HEADER_ONLY[kind](rows, columns, tmp_path)
    assert len(content) < 2048  # the header declares the size; there are no pixels to speak of
    response = clients["open"].post("/v1/predictions", **upload(content))
    assert response.status_code == 413, response.text
    assert f"{rows} x {columns} pixels" in assert_declared(contract, "post", "/v1/predictions", response)["detail"]


def test_unknown_routes_and_methods_answer_in_the_error_shape(clients):
    for response, status in ((clients["open"].get("/v2/nothing"), 404), (clients["open"].delete("/v1/model"), 405),
                             (clients["open"].get("/static/nothing.js"), 404),
                             (clients["open"].request("GET", "/healthz", content=b"\0" * (MAX_UPLOAD_BYTES + 1)), 413)):
        assert response.status_code == status and response.headers["content-type"] == "application/json"
        assert schemas.ErrorOut.model_validate(response.json()).status == status


def test_an_internal_error_says_no_more_than_that(trained_run, tmp_path, contract):
    with TestClient(create_app(settings_for(trained_run, tmp_path)), raise_server_exceptions=False) as client:
        client.app.state.services.card = {"identity": "not a model card"}  # the response model refuses it: a bug
        response = client.get("/v1/model")
    assert response.status_code == 500
    body = assert_declared(contract, "get", "/v1/model", response)
    assert body["detail"].startswith("internal error") and "identity" not in body["detail"]
