"""S3 endpoints: AWS when none is configured, the addressing style, and a public endpoint
for the presigned POST (the clients' address of the store, not the processes')."""

from __future__ import annotations

from urllib.parse import urlsplit

from fastapi.testclient import TestClient

from outbox_app.api.app import create_app
from outbox_images.settings import ImageSettings
from outbox_images.storage import presigning_client, s3_client
from tests.auth import AUTH_A
from tests.images import png_bytes, upload


def test_an_empty_endpoint_means_aws_in_the_configured_region(monkeypatch):
    monkeypatch.setenv("OUTBOX_S3_ENDPOINT", "")
    settings = ImageSettings(s3_region="eu-west-1")
    assert settings.s3_endpoint is None
    client = s3_client(settings)
    assert client.meta.endpoint_url == "https://s3.eu-west-1.amazonaws.com"
    assert client.meta.config.s3["addressing_style"] == "auto"


def test_without_a_region_setting_aws_default_region_applies(monkeypatch):
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-southeast-2")
    settings = ImageSettings(s3_endpoint=None, s3_region=None)
    assert s3_client(settings).meta.endpoint_url == "https://s3.ap-southeast-2.amazonaws.com"


def test_virtual_hosted_addressing_puts_the_bucket_in_the_host():
    settings = ImageSettings(s3_endpoint=None, s3_region="eu-west-1",
                             s3_addressing_style="virtual", s3_bucket="blobs-of-acme")
    client = s3_client(settings)
    assert client.meta.config.s3["addressing_style"] == "virtual"
    post = client.generate_presigned_post("blobs-of-acme", "k")  # signed locally
    assert urlsplit(post["url"]).hostname == "blobs-of-acme.s3.eu-west-1.amazonaws.com"


def test_a_custom_endpoint_is_path_style_unless_told_otherwise():
    custom = ImageSettings(s3_endpoint="http://minio:9000", s3_bucket="b")
    client = s3_client(custom)
    assert client.meta.endpoint_url == "http://minio:9000"
    assert client.meta.config.s3["addressing_style"] == "path"
    assert client.generate_presigned_post("b", "k")["url"] == "http://minio:9000/b"
    forced = ImageSettings(s3_endpoint="http://minio:9000", s3_addressing_style="virtual")
    assert s3_client(forced).meta.config.s3["addressing_style"] == "virtual"


def test_the_presigning_client_uses_the_public_endpoint_and_the_others_the_internal():
    settings = ImageSettings(s3_endpoint="http://minio:9000",
                             s3_public_endpoint="https://files.example.com")
    assert presigning_client(settings).meta.endpoint_url == "https://files.example.com"
    assert s3_client(settings).meta.endpoint_url == "http://minio:9000"
    assert presigning_client(settings.model_copy(update={"s3_public_endpoint": None})
                             ).meta.endpoint_url == "http://minio:9000"


def test_the_apis_presigned_post_carries_the_public_host_and_uploads(api_settings):
    internal = urlsplit(api_settings.s3_endpoint)
    assert internal.hostname == "127.0.0.1"
    public = f"http://localhost:{internal.port}"
    settings = api_settings.model_copy(update={"s3_public_endpoint": public})
    app = create_app(settings)
    body = png_bytes("public endpoint")
    with TestClient(app) as api:
        created = api.post("/v1/images", headers=AUTH_A, json={
            "filename": "a.png", "content_type": "image/png", "size": len(body)}).json()
        assert urlsplit(created["upload_url"]).netloc == f"localhost:{internal.port}"
        assert upload(created, body).status_code in (200, 204)
        # The server side verifies the object through the internal endpoint.
        confirmed = api.post(f"/v1/images/{created['id']}/uploaded", headers=AUTH_A)
        assert confirmed.status_code == 200, confirmed.text
        assert confirmed.json()["object_size"] == len(body)
    app.state.ctx.engine.dispose()
