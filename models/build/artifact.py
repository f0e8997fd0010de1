"""`rac build`: data -> encoder -> memory -> neighbours -> head -> one artifact directory for the service.

rac build --out artifacts/demo          # Fashion-MNIST-LT, a 58k-item memory (README, "Choices")
rac build --quick --out /tmp/quick      # a few hundred memory items, for tests: well under two minutes
"""

from __future__ import annotations

import datetime
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import faiss
import numpy as np
import torch

from models.build.evaluate import JSON, evaluate_head
from models.data import Dataset, Splits, class_buckets, fashion_mnist, list_dataset, long_tailed_splits
from models.features import Prepared, cached_embed, export_encoder
from models.finetune import FinetuneConfig, export_served, make_tuning, query_vectors
from models.heads import Head, HeadConfig
from models.memory.make import Memory, item_keys, make_memory, retrieve, thumbnails, write_memory
from models.train import MemoryTensors, TrainConfig, predict, train_head
from models.zero_shot.user_pair import UserPair, wrap_image_tower
from service.artifacts import (
    CHECKED_FILES,
    ENCODER,
    EXAMPLES,
    FORMAT_VERSION,
    HEAD,
    MANIFEST,
    EncoderInfo,
    HeadInfo,
    IndexInfo,
    Manifest,
    MemoryInfo,
    QueryInfo,
    ZeroShotInfo,
    digest,
    model_identity,
    version_id,
)
from service.core.decode import InputSpec

log = logging.getLogger(__name__)


@dataclass
class DataConfig:
    ratio: float = 1000.0  # long tail: most / fewest training images per class (about Places-LT's)
    val_per_class: int = 200  # balanced validation carved out of training data, kept out of the memory
    seed: int = 0
    quick: bool = False  # a small subset: 600 training-pool and 200 test images
    # A user's dataset instead of Fashion-MNIST: "relative/path label" list files over an image folder.
    root: Path | None = None
    train_list: Path | None = None
    val_list: Path | None = None
    test_list: Path | None = None
    external_list: Path | None = None
    classes: Path | None = None


@dataclass
class BuildConfig:
    out: Path
    cache: Path = Path(".cache/rac")
    data: DataConfig = field(default_factory=DataConfig)
    encoder: str = "efficientnet-lite0"
    checkpoint: Path | None = None  # ViT weights: a Hugging Face folder or a timm file
    input_size: int = 64  # Fashion-MNIST is 28x28; 64 px: see README "Choices"
    grey: bool = True
    pca_dim: int = 256  # 0: keep the encoder's own dimension
    sources: tuple[str, ...] = ("downstream", "external")
    values: str = "text"  # text (all-MiniLM-L6-v2) | visual (EfficientNet-Lite2)
    noise: float = 0.4  # probability an external item's text names a wrong class
    index: str = "auto"  # or a FAISS factory string
    exact_below: int = 20_000
    target_recall: float = 0.95
    # Serving nprobe: the smallest power of two up to the recall-chosen one whose validation top-1 (with the
    # trained head) is within this many points of the recall-chosen one's (README, "Choices").
    nprobe_tolerance: float = 0.2
    k: int = 100
    head: HeadConfig = field(default_factory=HeadConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    examples: int = 10
    # Train the query encoder's last blocks with the head (models/finetune.py); the search keeps the frozen one.
    finetune: FinetuneConfig | None = None
    zero_shot: bool = False  # also the aligned text tower, text index and fusion modules (models/zero_shot/build.py)
    # A user's aligned pair (models/zero_shot/user_pair.py): the image tower is the encoder, the text tower needs no
    # projection. All four or none.
    image_tower: Path | None = None
    text_tower: Path | None = None
    tokenizer: Path | None = None
    preprocess: Path | None = None

    def user_pair(self) -> UserPair | None:
        parts = (self.image_tower, self.text_tower, self.tokenizer, self.preprocess)
        if all(p is None for p in parts):
            return None
        if any(p is None for p in parts) or not self.zero_shot:
            raise ValueError("a user pair needs --zero-shot, --image-tower, --text-tower, --tokenizer and --preprocess")
        return UserPair.read(*(Path(str(p)) for p in parts))


def config_from_manifest(manifest: Manifest, out: Path, cache: Path) -> BuildConfig:
    """The configuration an artifact directory was built with (to re-create its data and memory)."""
    known = {f.name for f in fields(BuildConfig)}  # not what was recorded beside them (seconds, memory_ops)
    b: JSON = {k: v for k, v in manifest.build.items() if k in known}
    paths = ("root", "train_list", "val_list", "test_list", "external_list", "classes")
    data: JSON = {k: (Path(v) if k in paths and v else v) for k, v in b["data"].items()}
    b["data"] = DataConfig(**data)
    b["head"], b["train"] = HeadConfig(**b["head"]), TrainConfig(**b["train"])
    # A build from before `head` was recorded trained its head conv and projection.
    b["finetune"] = FinetuneConfig(**({"head": "trained"} | b["finetune"])) if b.get("finetune") else None
    b["sources"] = tuple(b["sources"])
    for name in ("checkpoint", "image_tower", "text_tower", "tokenizer", "preprocess"):
        b[name] = Path(b[name]) if b.get(name) else None
    b["out"], b["cache"] = out, cache
    return BuildConfig(**b)


def load_data(cfg: DataConfig) -> tuple[Dataset, Splits]:
    if cfg.root is not None:
        if not (cfg.train_list and cfg.val_list and cfg.test_list):
            raise ValueError("a list dataset needs --train-list, --val-list and --test-list")
        return list_dataset(cfg.root, cfg.train_list, cfg.val_list, cfg.test_list, cfg.classes, cfg.external_list)
    dataset = fashion_mnist()
    if cfg.quick:
        dataset = dataset.subsample({"train": 600, "test": 200}, cfg.seed)
        return dataset, long_tailed_splits(dataset, ratio=10.0, val_per_class=10, seed=cfg.seed)
    return dataset, long_tailed_splits(dataset, cfg.ratio, cfg.val_per_class, cfg.seed)


def prepare(cfg: BuildConfig, encoder_path: Path, exported: EncoderInfo | None = None) -> Prepared:
    """Load the data, export the encoder to `encoder_path` (unless `exported` describes the one already
    there) and embed every image pool with it."""
    dataset, splits = load_data(cfg.data)
    pair = cfg.user_pair() if exported is None else None
    if pair is not None:  # the user's image tower, as it is: no PCA (it is aligned)
        spec, projection = pair.spec.image, "none"
        wrap_image_tower(pair.image_tower, pair.spec, encoder_path)
    elif exported is None:
        fit_part = splits.external if splits.external is not None else splits.train
        fit_images = dataset.pools[fit_part.pool].subset(fit_part.index[:: max(1, len(fit_part.index) // 10_000)])
        spec, projection = export_encoder(
            cfg.encoder, cfg.input_size, cfg.grey, cfg.pca_dim, fit_images, encoder_path, cfg.cache, cfg.checkpoint
        )
    else:
        spec, projection = InputSpec.from_dict(exported.input), exported.projection
    emb = {
        name: cached_embed(images, encoder_path, spec, cfg.cache, desc=f"embed {name}")
        for name, images in dataset.pools.items()
    }
    return Prepared(dataset, splits, spec, encoder_path, projection, emb)


def script_head(head: Head, sample: tuple[torch.Tensor, ...], path: Path) -> None:
    """TorchScript export, checked against the eager module on real inputs."""
    scripted = torch.jit.script(head)
    with torch.no_grad():
        want, got = head(*sample), scripted(*sample)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    scripted.save(str(path))


def write_examples(prep: Prepared, out: Path, count: int, probs: np.ndarray) -> list[JSON]:
    """A few test images as PNG (one per class first), with the offline predictions for them."""
    test = prep.splits.test
    labels = prep.dataset.labels(test)
    first = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)]
    rows = (first + [r for r in range(len(labels)) if r not in first])[:count]
    (out / EXAMPLES).mkdir(exist_ok=True)
    examples = []
    classes = prep.dataset.classes
    for n, r in enumerate(rows):
        name = classes[labels[r]].lower().replace("/", "-").replace(" ", "-")
        file = f"{EXAMPLES}/{n:02d}-{name}.png"
        prep.dataset.pools[test.pool].image(int(test.index[r])).save(out / file)
        examples.append(
            {
                "file": file,
                "label": classes[labels[r]],
                "predicted": classes[int(probs[r].argmax())],
                "probabilities": [round(float(p), 6) for p in probs[r]],
            }
        )
    return examples


def build(cfg: BuildConfig) -> Manifest:
    """Build into DIR.partial, then swap it in: a failed build never leaves a half-written directory."""
    final = cfg.out
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    t = time.perf_counter()
    manifest = _build(replace(cfg, out=partial))
    manifest.build["seconds"] = round(time.perf_counter() - t, 1)  # the whole build, kept in results/build.json
    (partial / MANIFEST).write_text(manifest.model_dump_json(indent=1))
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return manifest


def build_memory(cfg: BuildConfig, prep: Prepared, k: int) -> Memory:
    """The memory cfg describes, over prep's embeddings, with each training query's k neighbours searched."""
    return make_memory(
        prep,
        cfg.sources,
        cfg.values,
        cfg.noise,
        k,
        cfg.index,
        cfg.exact_below,
        cfg.target_recall,
        cfg.data.seed,
        cfg.cache,
    )


def build_zero_shot(cfg: BuildConfig, prep: Prepared, memory: Memory) -> ZeroShotInfo:
    from models.zero_shot.build import build_zero_shot as build_parts
    from models.zero_shot.evaluate import ZeroShotConfig

    zcfg = ZeroShotConfig()
    # k = 30: the best of the k sweep on validation (results/zero_shot.json)
    zcfg = replace(zcfg, fusion=replace(zcfg.fusion, k=30))
    if cfg.data.quick:  # a few hundred pairs: more passes, still seconds
        zcfg = replace(zcfg, align=replace(zcfg.align, epochs=40, batch_size=128))
        zcfg = replace(zcfg, fusion=replace(zcfg.fusion, epochs=10, batch_size=64))
    return build_parts(prep, memory, cfg.out, zcfg, cfg.user_pair())


def choose_nprobe(
    prep: Prepared,
    memory: Memory,
    head: Head,
    tensors: MemoryTensors,
    k: int,
    buckets: np.ndarray,
    tolerance: float,
    val_query: np.ndarray | None = None,
) -> JSON:
    """The serving nprobe, chosen on validation with accuracy in view: recall@k against exact search is a
    proxy; what matters is the head's answer. Every power of two up to the recall-chosen nprobe is measured
    (recall, validation top-1, search time a query at batch 32 on one thread); the smallest whose top-1 is
    within `tolerance` points of the recall-chosen one's is kept. Leaves memory.index at that nprobe.
    val_query: what the head reads for the validation images where it is not their search key (fine-tuned)."""
    index = memory.index
    if not isinstance(index, faiss.IndexIVF):
        return {}
    val = prep.splits.val
    z = np.ascontiguousarray(prep.emb[val.pool][val.index])  # (n, d)
    exact = faiss.IndexFlatIP(memory.keys.shape[1])
    exact.add(memory.keys)
    _, truth = exact.search(z, k)
    top, threads, rows = index.nprobe, faiss.omp_get_max_threads(), {}
    faiss.omp_set_num_threads(1)
    try:
        for nprobe in (2**e for e in range(int(np.log2(top)) + 1)):
            index.nprobe = nprobe
            t = time.perf_counter()
            found = np.concatenate([index.search(z[s : s + 32], k)[1] for s in range(0, len(z), 32)])
            ms = 1000 * (time.perf_counter() - t) / len(z)
            recall = float(np.mean([len(np.intersect1d(a, b)) / k for a, b in zip(found, truth, strict=True)]))
            found_val = retrieve(prep, memory, val, k)
            if val_query is not None:
                found_val = replace(found_val, z=val_query)
            acc = evaluate_head(head, found_val, tensors, k, buckets, memory.items.true_label)
            rows[str(nprobe)] = {"recall": recall, "val_top1": acc["accuracy"]["all"], "search_ms": ms}
    finally:
        faiss.omp_set_num_threads(threads)
    best = rows[str(top)]["val_top1"]
    chosen = min(int(n) for n, r in rows.items() if r["val_top1"] >= best - tolerance)
    index.nprobe = chosen
    log.info("nprobe %d (recall-chosen %d): %s", chosen, top, rows)
    return {"chosen": chosen, "recall_chosen": top, "tolerance": tolerance, "sweep": rows}


def _build(cfg: BuildConfig) -> Manifest:
    out = cfg.out
    prep = prepare(cfg, out / ENCODER)
    memory = build_memory(cfg, prep, cfg.k)
    k = min(cfg.k, len(memory.items) - 1)
    log.info(
        "memory: %d items, index %s (nprobe %d, recall@%d %.3f)",
        len(memory.items),
        memory.factory,
        memory.nprobe,
        k,
        memory.recall,
    )
    s = prep.splits
    train, val, test = (retrieve(prep, memory, p, k) for p in (s.train, s.val, s.test))
    tensors = MemoryTensors(memory.keys, memory.values)
    classes = prep.dataset.classes
    # A quick build has about a hundred training queries: small batches, more epochs, still seconds.
    tcfg = replace(cfg.train, batch_size=16, epochs=max(cfg.train.epochs, 30)) if cfg.data.quick else cfg.train
    tuning = make_tuning(prep, cfg.encoder, cfg.finetune, cfg.cache) if cfg.finetune is not None else None
    tuned = tuning.trainable() if tuning is not None else None
    head = train_head(cfg.head, tcfg, train, tensors, k, len(classes), item_labels=memory.items.label, tuned=tuned)
    # What the head reads for validation and test images: their search keys, or the fine-tuned queries.
    queries: dict[str, np.ndarray] = {}
    query: QueryInfo | None = None
    if tuned is not None and tuning is not None:
        queries = {"val": query_vectors(tuned.tail, tuning.val), "test": query_vectors(tuned.tail, tuning.test)}
        val, test = replace(val, z=queries["val"]), replace(test, z=queries["test"])
        query = QueryInfo(dim=queries["val"].shape[1], finetune=tuning.cfg.to_dict())
    counts = np.bincount(train.labels, minlength=len(classes))
    buckets = class_buckets(counts)
    sweep = choose_nprobe(prep, memory, head, tensors, k, buckets, cfg.nprobe_tolerance, queries.get("val"))
    if sweep:  # the served nprobe changed the neighbours: evaluate what will be served
        val, test = (retrieve(prep, memory, p, k) for p in (s.val, s.test))
        memory.recall = sweep["sweep"][str(sweep["chosen"])]["recall"]
        if queries:
            val, test = replace(val, z=queries["val"]), replace(test, z=queries["test"])
    evaluation = {
        split: evaluate_head(head, data, tensors, k, buckets, memory.items.true_label)
        for split, data in (("val", val), ("test", test))
    }
    evaluation["nprobe"] = sweep
    evaluation["train_counts"] = {c: int(n) for c, n in zip(classes, counts, strict=True)}
    evaluation["buckets"] = {c: str(b) for c, b in zip(classes, buckets, strict=True)}
    log.info("test accuracy: %s", evaluation["test"]["accuracy"])

    thumbs = thumbnails(prep.dataset, memory.items)
    write_memory(
        out, memory.index, memory.keys, memory.values, memory.items, thumbs, item_keys(prep.dataset.name, memory.items)
    )
    if tuned is not None and tuning is not None:  # the two-output graph replaces the frozen one
        export_served(tuning, tuned.tail, prep, out / ENCODER)
    zero_shot = build_zero_shot(cfg, prep, memory) if cfg.zero_shot else None
    script_head(head, tensors.batch(val, np.arange(min(64, len(val.labels))), k, head), out / HEAD)
    logits, _ = predict(head, test, tensors, k)
    probs = torch.softmax(torch.from_numpy(logits), -1).numpy()
    examples = write_examples(prep, out, cfg.examples, probs)
    return write_manifest(cfg, prep, memory, head, k, evaluation, examples, zero_shot, query)


def write_manifest(
    cfg: BuildConfig,
    prep: Prepared,
    memory: Memory,
    head: Head,
    k: int,
    evaluation: JSON,
    examples: list[JSON],
    zero_shot: ZeroShotInfo | None = None,
    query: QueryInfo | None = None,
) -> Manifest:
    out = cfg.out
    files = {name: digest(out / name) for name in CHECKED_FILES}
    version = version_id(files)
    sources = {str(s): int(n) for s, n in zip(*np.unique(memory.items.source, return_counts=True), strict=True)}
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        memory_version=version,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        encoder=EncoderInfo(
            name=cfg.encoder,
            input=prep.spec.to_dict(),
            dim=memory.keys.shape[1],
            projection=prep.projection,
            query=query,
        ),
        memory=MemoryInfo(
            size=len(memory.items),
            sources=sources,
            next_id=len(memory.items),
            value_encoder=memory.value_encoder,
            value_dim=memory.values.shape[1],
            text_noise=cfg.noise,
        ),
        index=IndexInfo(
            type=memory.factory, metric="cosine", nprobe=memory.nprobe, recall_at_k=round(memory.recall, 4), k=k
        ),
        head=HeadInfo(
            kind=cfg.head.kind,
            config=cfg.head.to_dict(),
            train=cfg.train.to_dict(),
            layers=head.num_layers,
            uses_keys=head.uses_keys,
        ),
        classes=prep.dataset.classes,
        files=files,
        evaluation=evaluation,
        examples=examples,
        build=json.loads(json.dumps({k: v for k, v in asdict(cfg).items() if k != "out"}, default=str)),
        zero_shot=zero_shot,
    )
    manifest.model_id = model_identity(manifest)
    (out / MANIFEST).write_text(manifest.model_dump_json(indent=1))
    return manifest
