"""Worker benchmark against the real local stack.

- OCR: the OCR worker's images/s against tesseract alone on the same images with the same
  concurrency, one recognition at a time and at the default concurrency (the usable cores).
  The worker's run is `OcrWorker.apply` on the images' `ocr_requested` events: per image it
  reads and ETag-checks the object, looks up the result cache, moves the image through
  `ocr_running` -> `ocr_done` -> `embedding_pending` with their events, and runs tesseract.
  Tesseract alone reads the same bytes from memory.
- Embedding: the embedding worker's texts/s on those images (`embedding_pending` ->
  `embedded`, with the result cache and the transitions) against the model called directly
  on the same texts in one batch.

Each round uses images of its own text (no result-cache hits). Writes
bench/results/workers.{json,md} (--quick: quick.workers.{json,md}, ignored by git).

    python -m bench.workers            # 24 images per round, 3 rounds per case
    python -m bench.workers --quick    # 4 images, 1 round (CI)
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import text

from bench.cli import bench_main
from outbox.db import make_engine
from outbox_app.api.app import create_app
from outbox_app.sample_images import text_image
from outbox_app.settings import AppSettings
from outbox_app.workers.embed import EmbeddingWorker, embedding_text
from outbox_app.workers.embedder import get_embedder
from outbox_app.workers.ocr import OcrWorker
from outbox_app.workers.ocr_engine import pin_engine_threads, recognize
from outbox_images.storage import s3_client
from tests.auth import AUTH_A
from tests.events import latest_event
from tests.images import upload
from tests.pipeline_harness import isolated_settings

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def bodies(count: int, tag: str) -> list[bytes]:
    """`count` receipts, English and Chinese in turn, each with text of its own."""
    out = []
    for i in range(count):
        n = f"{tag}{i:03d}"
        lines = ([f"Invoice {n}", "Coffee 3.50", "Total 12.50"] if i % 2 == 0 else
                 [f"发票 {n}", "咖啡 3.50", "合计 12.50"])
        out.append(text_image(lines))
    return out


def pending_images(api: TestClient, images: list[bytes]) -> list[str]:
    """Each image uploaded (presigned POST), confirmed, with metadata: `ocr_pending`."""
    ids = []
    for i, body in enumerate(images):
        created = api.post("/v1/images", headers=AUTH_A, json={
            "filename": f"{i}.png", "content_type": "image/png", "size": len(body),
            "metadata": {"title": "receipt"}}).json()
        if upload(created, body).status_code not in (200, 204):
            raise RuntimeError("upload refused")
        api.post(f"/v1/images/{created['id']}/uploaded", headers=AUTH_A)
        ids.append(created["id"])
    return ids


def tesseract_alone(images: list[bytes], concurrency: int, languages: str) -> float:
    """Seconds for tesseract to read `images` from memory, `concurrency` at once."""
    pin_engine_threads()  # as the worker does
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda b: recognize(b, languages), images))
    return time.perf_counter() - start


def worker_run(settings: AppSettings, images: list[bytes], concurrency: int
               ) -> dict[str, float]:
    """Seconds for the OCR worker to take `images` from `ocr_pending` to
    `embedding_pending`, `concurrency` at once, in one batch as the runtime hands it over;
    then for the model alone and for the embedding worker on the texts OCR found."""
    s = settings.model_copy(update={"ocr_concurrency": concurrency})
    engine = make_engine(s)
    with TestClient(create_app(s)) as api:
        ids = pending_images(api, images)
    worker = OcrWorker(s, engine, s3_client(s))
    events = [latest_event(engine, i) for i in ids]
    start = time.perf_counter()
    worker.apply(events)
    out = {"ocr_worker_s": time.perf_counter() - start}
    worker.close()
    events = [latest_event(engine, i) for i in ids]
    if any(e.payload["state"] != "embedding_pending" for e in events):
        raise RuntimeError("an image did not go through OCR")
    embedder = get_embedder(s.embedding_model)
    embedder.passages(["warm-up"])
    texts = [embedding_text(e.payload) for e in events]
    start = time.perf_counter()
    embedder.passages(texts)
    out["model_s"] = time.perf_counter() - start
    start = time.perf_counter()
    EmbeddingWorker(s, engine, embedder).apply(events)
    out["embed_worker_s"] = time.perf_counter() - start
    with engine.connect() as conn:
        embedded = conn.execute(text("select count(*) from image where state = 'embedded'")
                                ).scalar_one()
    engine.dispose()
    if embedded < len(ids):
        raise RuntimeError(f"only {embedded} of {len(ids)} images were embedded")
    return out


def case(settings: AppSettings, count: int, concurrency: int, rounds: int) -> dict[str, Any]:
    """The workers against the engine and the model alone, pair by pair (`rounds` pairs,
    fresh images each)."""
    ocr, ocr_alone, ocr_ratio, emb, emb_alone, emb_ratio = [], [], [], [], [], []
    for r in range(rounds):
        images = bodies(count, f"c{concurrency}r{r}{uuid.uuid4().hex[:4]}")
        alone = tesseract_alone(images, concurrency, settings.ocr_languages)
        with isolated_settings("bocr") as s:
            got = worker_run(s, images, concurrency)
        ocr_alone.append(count / alone)
        ocr.append(count / got["ocr_worker_s"])
        ocr_ratio.append(alone / got["ocr_worker_s"])
        emb_alone.append(count / got["model_s"])
        emb.append(count / got["embed_worker_s"])
        emb_ratio.append(got["model_s"] / got["embed_worker_s"])

    def med(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    return {"concurrency": concurrency, "images": count, "rounds": rounds,
            "ocr": {"worker_images_per_s": med(ocr), "tesseract_images_per_s": med(ocr_alone),
                    "ratio": med(ocr_ratio),
                    "ratio_spread": [round(min(ocr_ratio), 3), round(max(ocr_ratio), 3)]},
            "embedding": {"worker_texts_per_s": med(emb), "model_texts_per_s": med(emb_alone),
                          "ratio": med(emb_ratio),
                          "ratio_spread": [round(min(emb_ratio), 3), round(max(emb_ratio), 3)]}}


def run(count: int, rounds: int, name: str) -> dict[str, Any]:
    """Both concurrencies; the results written to bench/results/<name>.{json,md}."""
    default = AppSettings().ocr_concurrency
    cases = [case(AppSettings(), count, c, rounds) for c in sorted({1, default})]
    one, best = cases[0], cases[-1]
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "cases": cases,
        "ocr": {"ratio": best["ocr"]["ratio"],
                "speedup_default_vs_one": round(best["ocr"]["worker_images_per_s"]
                                                / one["ocr"]["worker_images_per_s"], 2)},
        "embedding": {"ratio": best["embedding"]["ratio"]}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Worker benchmark: {count} images per round (half English, half Chinese), "
             f"{rounds} rounds per case, medians", "",
             "| OCR concurrency | OCR worker images/s | tesseract alone | ratio (spread) "
             "| embedding worker texts/s | model alone | ratio (spread) |",
             "|---|---|---|---|---|---|---|"]
    for c in cases:
        o, e = c["ocr"], c["embedding"]
        lines.append(f"| {c['concurrency']} | {o['worker_images_per_s']} | "
                     f"{o['tesseract_images_per_s']} | {o['ratio']} ({o['ratio_spread'][0]}-"
                     f"{o['ratio_spread'][1]}) | {e['worker_texts_per_s']} | "
                     f"{e['model_texts_per_s']} | {e['ratio']} ({e['ratio_spread'][0]}-"
                     f"{e['ratio_spread'][1]}) |")
    lines += ["", f"OCR at the default concurrency ({default}) against one at a time: "
              f"{result['ocr']['speedup_default_vs_one']}x the images/s."]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


def main() -> None:
    """Command-line entry point."""
    bench_main(__doc__, full=lambda: run(count=24, rounds=3, name="workers"),
               quick=lambda: run(count=4, rounds=1, name="quick.workers"))


if __name__ == "__main__":
    main()
