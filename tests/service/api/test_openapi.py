"""Each app's OpenAPI document states its own limits, though every app shares the module-level routes."""

from __future__ import annotations

from dataclasses import replace

from fastapi.testclient import TestClient

from service.api.state import AppState
from service.app import build_app
from tests.service.api.conftest import CONFIG, SETTINGS


def document(max_num_images: int, max_steps: int) -> dict:
    state = AppState.for_model(replace(SETTINGS, max_num_images=max_num_images, max_steps=max_steps), CONFIG)
    return TestClient(build_app(state)).get("/openapi.json").json()


def test_two_apps_in_one_process_document_their_own_limits() -> None:
    small, large = document(2, 10), document(16, 250)
    for doc, images, steps in ((small, 2, 10), (large, 16, 250)):
        generate = doc["paths"]["/v1/generate"]["post"]
        fields = generate["requestBody"]["content"]["application/json"]["schema"]["properties"]
        assert fields["num_images"]["maximum"] == images and fields["steps"]["anyOf"][0]["maximum"] == steps
        assert f"Generate 1 to {images} images" in generate["description"]
        encode = doc["paths"]["/v1/encode"]["post"]
        assert "[B, 4, 4, 4]" in encode["description"]
        assert (
            encode["requestBody"]["content"]["application/json"]["schema"]["properties"]["images"]["maxItems"]
            == images
        )


def test_no_placeholder_is_left_in_the_document() -> None:
    doc = document(4, 50)
    text = str(doc)
    assert "$" not in "".join(
        op.get("description", "") for ops in doc["paths"].values() for op in ops.values()
    )
    assert "x-pae-app-model" not in text
