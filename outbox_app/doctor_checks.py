"""The application's `outbox doctor` checks (entry-point group `outbox.doctor`): the image
topic, the search server and its alias, the bucket, and Redis."""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit

from outbox.doctor.findings import DoctorOptions, Finding, failed, passed, warned
from outbox.doctor.kafka import cluster_metadata, topic_presence
from outbox.extras import require_extra
from outbox_app.settings import AppSettings, get_app_settings
from outbox_images.store import AGGREGATE

PROBE_PREFIX = ".outbox-doctor/"  # outside orgs/, so an audit never sees a probe object
SAFE_POLICIES = ("noeviction",)


def checks(options: DoctorOptions) -> list[Finding]:
    """Every check of the application's stores (skipped, naming the extra, when their
    clients are not installed)."""
    require_extra("the image application's checks", "api")
    settings = get_app_settings()
    return [*image_topic_findings(settings, options.timeout_s),
            *search_findings(settings, options.timeout_s),
            *s3_findings(settings, options.timeout_s),
            *redis_findings(settings, options.timeout_s)]


def _host(url: str) -> str:
    """The URL without credentials, for messages."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def image_topic_findings(settings: AppSettings, timeout_s: float) -> list[Finding]:
    """The image events' topic exists (reachability itself is the core's check)."""
    metadata = cluster_metadata(settings, timeout_s)
    return [] if isinstance(metadata, Finding) else topic_presence(settings, [AGGREGATE],
                                                                   metadata)


def search_version_finding(server: str, client: str) -> Finding:
    """elasticsearch-py talks to a server of its own major version; a server older than the
    client's minor may refuse what the client sends."""
    (s_major, s_minor), (c_major, c_minor) = (
        tuple(int(p) for p in v.split(".")[:2]) for v in (server, client))
    if s_major != c_major:
        return failed("search.version", f"server {server}, client elasticsearch-py {client}: "
                      "the major versions must match",
                      f"install elasticsearch>={s_major},<{s_major + 1} (pip), or use a "
                      f"server of version {c_major}")
    if s_minor < c_minor:
        return warned("search.version", f"server {server} is older than the client "
                      f"elasticsearch-py {client}: a request the client shapes for "
                      f"{c_major}.{c_minor} may be refused",
                      f"pin elasticsearch<{s_major}.{s_minor + 1} (pip), or upgrade the server")
    return passed("search.version", f"server {server}, client elasticsearch-py {client}")


def search_findings(settings: AppSettings, timeout_s: float) -> list[Finding]:
    """The server answers as Elasticsearch of a matching version, and the alias exists."""
    import elasticsearch

    es = elasticsearch.Elasticsearch(settings.es_url, request_timeout=timeout_s, max_retries=0)
    try:
        info = es.info()
        found = [passed("search.reachable", f"{info['name']} at {_host(settings.es_url)}"),
                 search_version_finding(info["version"]["number"],
                                        elasticsearch.__versionstr__)]
        alias = settings.es_index
        if es.indices.exists_alias(name=alias):
            found.append(passed("search.alias", f"alias {alias} -> "
                                f"{', '.join(sorted(es.indices.get_alias(name=alias)))}"))
        elif es.indices.exists(index=alias):
            found.append(failed("search.alias", f"{alias} is an index, not an alias: a rebuild "
                                "cannot switch the readers to a new index",
                                f"delete the index {alias}, then `outbox rebuild search`"))
        else:
            found.append(warned("search.alias", f"alias {alias} (OUTBOX_ES_INDEX) does not "
                                "exist yet",
                                "start the search projector (`outbox project search`, it "
                                "creates the alias and its index) or fill it from the log now: "
                                "`outbox rebuild search`"))
        return found
    except (elasticsearch.ApiError, elasticsearch.TransportError,
            elasticsearch.UnsupportedProductError) as exc:
        return [failed("search.reachable", f"the search server at {_host(settings.es_url)} "
                       f"does not answer as Elasticsearch: {exc}", "OUTBOX_ES_URL")]
    finally:
        es.close()


def _s3_where(settings: AppSettings) -> str:
    return settings.s3_endpoint or "AWS S3"


def s3_findings(settings: AppSettings, timeout_s: float) -> list[Finding]:
    """The bucket exists, and a probe object can be written, read and deleted."""
    from botocore.exceptions import BotoCoreError, ClientError

    from outbox_images.storage import s3_client

    s3 = s3_client(settings, timeout_s=timeout_s)
    bucket, where = settings.s3_bucket, _s3_where(settings)
    credentials = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or the pod's IAM role)"
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket"):
            return [failed("s3.bucket", f"bucket {bucket} does not exist at {where}",
                           f"create it (aws s3 mb s3://{bucket}), or set OUTBOX_S3_BUCKET")]
        return [failed("s3.bucket", f"bucket {bucket} at {where} refused: {code} "
                       f"{exc.response.get('Error', {}).get('Message', '')}".rstrip(),
                       f"{credentials}; the credentials' access to the bucket")]
    except BotoCoreError as exc:
        return [failed("s3.bucket", f"{where} cannot be used: {exc}",
                       f"OUTBOX_S3_ENDPOINT (empty for AWS), OUTBOX_S3_REGION, {credentials}")]
    found = [passed("s3.bucket", f"bucket {bucket} at {where}")]
    key, body = f"{PROBE_PREFIX}{uuid.uuid4()}", b"outbox doctor probe"
    step = "put"
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=body)
        step = "get"
        if s3.get_object(Bucket=bucket, Key=key)["Body"].read() != body:
            raise ValueError("the object read back differs from the one written")
        step = "delete"
        s3.delete_object(Bucket=bucket, Key=key)
    except (ClientError, BotoCoreError, ValueError) as exc:
        return [*found, failed("s3.objects", f"{step} of the probe object {key} failed: {exc}",
                               f"{credentials}: they need s3:PutObject, s3:GetObject and "
                               f"s3:DeleteObject on {bucket}")]
    return [*found, passed("s3.objects", "put, get and delete of a probe object work")]


def redis_findings(settings: AppSettings, timeout_s: float) -> list[Finding]:
    """Redis answers, and does not evict the task cache's entries."""
    from redis import Redis
    from redis.exceptions import RedisError, ResponseError

    client = Redis.from_url(settings.redis_url, socket_connect_timeout=timeout_s,
                            socket_timeout=timeout_s)
    where = _host(settings.redis_url)
    try:
        client.ping()
    except RedisError as exc:
        return [failed("redis.reachable", f"Redis at {where} does not answer: {exc}",
                       "OUTBOX_REDIS_URL (host, port, password)")]
    found = [passed("redis.reachable", f"Redis at {where}")]
    try:
        config = client.config_get("maxmemory*")
    except ResponseError as exc:
        return [*found, warned("redis.maxmemory_policy",
                               f"maxmemory-policy cannot be read ({exc})",
                               "check in the provider's parameter group that "
                               "maxmemory-policy is noeviction")]
    finally:
        client.close()
    policy, limit = config.get("maxmemory-policy"), int(config.get("maxmemory") or 0)
    if policy in SAFE_POLICIES or limit == 0:
        note = "" if policy in SAFE_POLICIES else " (no maxmemory: nothing is evicted)"
        return [*found, passed("redis.maxmemory_policy", f"maxmemory-policy {policy}{note}")]
    return [*found, warned("redis.maxmemory_policy",
                           f"maxmemory-policy {policy} with maxmemory {limit}: Redis may evict "
                           "task-cache entries (`outbox rebuild cache` restores them)",
                           "CONFIG SET maxmemory-policy noeviction (managed Redis: its "
                           "parameter group), or give the task cache a Redis of its own")]
