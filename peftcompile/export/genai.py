"""Export to an onnxruntime-genai model folder with switchable LoRA / GraLoRA / RaSA adapters.

onnxruntime-genai (``og.Model``, ``og.Generator``, ``og.Adapters``) runs an LLM on device with
a KV cache, a tokenizer and a generation loop; its model builder
(``python -m onnxruntime_genai.models.builder``) writes the folder from an HF checkpoint. The
builder only knows PEFT LoRA, and *bakes* it into the graph. :func:`to_genai` turns that into
a hot-swappable model:

1. every adapter is read (``peftcompile.load_adapters`` / ``load_peft_adapter``) onto one copy
   of the base, under its own name -- a wrong shape or spec fails here, before anything is
   written -- and converted site by site with its method's exact LoRA form
   (``Method.as_lora``: GraLoRA(r, k) is a LoRA of rank k*r (+hybrid), RaSA a LoRA of rank
   (r-k)+L*k with D folded into B; scaling folded into B);
2. the base is built once with a *layout* PEFT LoRA adapter of rank 1 over the union of the
   adapters' sites; each site's layout A/B holds a distinct integer code, so the builder's
   constants ``<...>.lora_A.MatMul.weight`` ([in, r]) / ``lora_B`` ([r, out]) are matched to
   our sites by value, whatever the builder names them;
3. those constants become graph inputs with zero-size defaults ([in, 0], [0, out]: the model
   runs as the base when no adapter is active), each pair with its *own* symbolic rank
   dimension (a shared name makes ORT reuse buffers across pairs: "Shape mismatch attempting
   to re-use buffer" for subset or mixed-rank adapters);
4. one ``<name>.onnx_adapter`` (``onnxruntime.AdapterFormat``) per adapter, keyed by those
   input names, and ``<name>.adapter.json`` next to it with our spec (method config, sites,
   ranks, the base fingerprint). :class:`GenaiAdapters` checks the JSON before
   ``og.Adapters.load``.

``merged=True`` writes a plain genai folder of the merged model instead (no adapter inputs).
Everything is built in a temporary sibling folder and renamed into place.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import AdapterError

__all__ = ["to_genai", "GenaiExport", "GenaiAdapters", "greedy", "read_manifest", "GENAI_VERSION_RANGE",
           "MANIFEST_NAME", "SPEC_SUFFIX", "ORT_ADAPTER_SUFFIX", "SUPPORTED_TARGETS"]

#: onnxruntime-genai versions this exporter is tested with (the builder's graph layout and
#: option names change between minor versions).
GENAI_VERSION_RANGE = ((0, 18), (0, 19))
GENAI_PIN = "onnxruntime-genai>=0.18,<0.19"
MANIFEST_NAME = "peftcompile_genai.json"
SPEC_SUFFIX = ".adapter.json"
ORT_ADAPTER_SUFFIX = ".onnx_adapter"
FORMAT = "peftcompile-genai/1"
ADAPTER_FORMAT = "peftcompile-genai-adapter/1"
#: (precision, device) pairs the builder supports (its own list, restricted to CPU/CUDA).
SUPPORTED_TARGETS = {("fp32", "cpu"), ("int4", "cpu"), ("fp32", "cuda"), ("fp16", "cuda"), ("int4", "cuda")}
_LORA_A = ".lora_A.MatMul.weight"
_LORA_B = ".lora_B.MatMul.weight"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


# ----------------------------------------------------------------------------- results


@dataclass
class GenaiExport:
    """What :func:`to_genai` wrote."""

    path: Path
    merged: bool
    precision: str
    device: str
    architecture: str
    fingerprint: str  # sha256 of the base weights the adapters belong to
    adapters: dict[str, Path] = field(default_factory=dict)  # name -> .onnx_adapter
    adapter_inputs: dict[str, dict] = field(default_factory=dict)  # site -> {"A", "B", "in", "out", "dtype"}
    sizes: dict[str, int] = field(default_factory=dict)  # "base" (model.onnx + data) and adapter names -> bytes


# ----------------------------------------------------------------------------- checks


def _require_genai():
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise AdapterError(f"to_genai needs onnxruntime-genai; pip install 'peftcompile[genai]' "
                           f"({GENAI_PIN})") from None
    ver = tuple(int(x) for x in re.findall(r"\d+", og.__version__)[:2])
    lo, hi = GENAI_VERSION_RANGE
    if not lo <= ver < hi:
        raise AdapterError(f"onnxruntime-genai {og.__version__} is untested with peftcompile (its builder's graph "
                           f"layout changes between versions); install {GENAI_PIN}")
    return og


def builder_architectures() -> set[str]:
    """HF architectures the installed onnxruntime-genai builder dispatches on (read from its source)."""
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime_genai")
    src = Path(spec.origin).parent / "models" / "builder.py"
    return set(re.findall(r'architectures\[0\]\s*==\s*"(\w+)"', src.read_text()))


def _check_target(precision: str, device: str) -> None:
    if (precision, device) not in SUPPORTED_TARGETS:
        raise AdapterError(f"precision={precision!r}, device={device!r} is not a target of the onnxruntime-genai "
                           f"builder; use one of {sorted(SUPPORTED_TARGETS)} (fp16 is CUDA-only)")


def _check_name(name: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name or ""):
        raise AdapterError(f"adapter name {name!r} must be a file-name-safe word (letters, digits, _ . -): it names "
                           f"the {ORT_ADAPTER_SUFFIX} file and og.Adapters' key")


def _fingerprint(model: nn.Module) -> str:
    """sha256 of the base weights (names, shapes, dtypes, bytes): what an adapter belongs to."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ----------------------------------------------------------------------------- base model


def _tokenizer_error(where: str) -> AdapterError:
    return AdapterError(f"{where} has no tokenizer files; the onnxruntime-genai builder needs them in the model "
                        f"folder: add tokenizer.json + tokenizer_config.json (e.g. tokenizer.save_pretrained(dir)), "
                        f"or pass tokenizer= with a model object")


def _check_arch(config: Any, where: str) -> str:
    arch = (getattr(config, "architectures", None) or [None])[0]
    if arch is None:
        raise AdapterError(f"{where}: config.architectures is empty; save the model with save_pretrained from its "
                           f"*ForCausalLM class")
    known = builder_architectures()
    if arch not in known:
        raise AdapterError(f"{where}: architecture {arch!r} is not supported by the onnxruntime-genai builder; "
                           f"supported: {sorted(known)}")
    return arch


def _load_base(model_or_hf_dir: nn.Module | str | Path, tokenizer: Any, tmp: Path) -> tuple[Path, nn.Module, str]:
    """(HF folder with tokenizer files, base model in fp32 eval mode, architecture)."""
    import transformers

    from ..state import state_of

    if isinstance(model_or_hf_dir, nn.Module):
        model = model_or_hf_dir
        if state_of(model) is not None:
            raise AdapterError(f"{type(model).__name__} carries peftcompile adapters; pass the base model and the "
                               f"adapters as folders (save_adapters) in adapters=")
        if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
            raise AdapterError(f"{type(model).__name__} is not a Hugging Face model; pass an HF model or folder")
        arch = _check_arch(model.config, type(model).__name__)
        if tokenizer is None:
            raise _tokenizer_error(f"{type(model).__name__} (a model object)")
        hf_dir = tmp / "hf_base"
        model.save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
        base = copy.deepcopy(model).float().eval()
        return hf_dir, base, arch
    hf_dir = Path(model_or_hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise AdapterError(f"{hf_dir} is not a Hugging Face model folder (no config.json)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = transformers.AutoConfig.from_pretrained(hf_dir)
    arch = _check_arch(config, str(hf_dir))
    if not any((hf_dir / f).is_file() for f in _TOKENIZER_FILES):
        raise _tokenizer_error(str(hf_dir))
    try:
        transformers.AutoTokenizer.from_pretrained(hf_dir)
    except (OSError, ValueError, TypeError) as e:
        raise AdapterError(f"{hf_dir}: its tokenizer files do not load ({e}); re-save them with "
                           f"tokenizer.save_pretrained") from None
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return hf_dir, base, arch


# ----------------------------------------------------------------------------- adapters -> LoRA


def _read_adapters(base: nn.Module, adapters: Mapping[str, str | Path]) -> nn.Module:
    """A copy of ``base`` with every adapter loaded under its name (all checked by the loaders)."""
    import peftcompile as pc

    work = copy.deepcopy(base)
    for name, d in adapters.items():
        d = Path(d)
        cfg_file = d / "adapter_config.json"
        if not cfg_file.is_file():
            raise AdapterError(f"adapter {name!r}: {d} has no adapter_config.json; pass a folder written by "
                               f"peftcompile.save_adapters or PEFT's save_pretrained")
        try:
            cfg = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AdapterError(f"adapter {name!r}: {cfg_file} is not valid JSON ({e})") from None
        try:
            if "peft_type" in cfg:
                pc.load_peft_adapter(work, d, name=name)
            else:
                pc.load_adapters(work, d, name=name)
        except AdapterError as e:
            raise AdapterError(f"adapter {name!r} does not fit this base model: {e}") from None
    return work


def _as_lora(work: nn.Module, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Site -> (A [R, in], B [out, R]) of adapter ``name``, exactly its delta (scaling in B)."""
    from ..methods import method_for
    from ..state import site_adapters, state_of

    spec = state_of(work).specs[name]
    if spec.trainable is not None or spec.bias is not None:
        raise AdapterError(f"adapter {name!r} trains whole modules or biases (trainable={spec.trainable!r}, "
                           f"bias={spec.bias!r}); a LoRA-only runtime cannot serve them: export it with merged=True, "
                           f"or train without AdapterSpec.trainable / bias")
    out = {}
    for host, _, cont in site_adapters(work):
        if name not in cont:
            continue
        a = cont[name]
        m = method_for(a.cfg)
        if m.as_lora is None:
            raise AdapterError(f"adapter {name!r}: method {m.name!r} has no exact LoRA form (Method.as_lora); "
                               f"onnxruntime-genai only runs LoRA: export it with merged=True")
        with torch.no_grad():
            A, B = m.as_lora(a.tensors(), a.cfg)
        A, B = A.detach().float(), B.detach().float()
        if tuple(A.shape[1:]) != (cont.in_features,) or tuple(B.shape[:1]) != (cont.out_features,):
            raise AdapterError(f"{cont.site}: as_lora of {m.name!r} gave A {tuple(A.shape)}, B {tuple(B.shape)}, "
                               f"expected [R, {cont.in_features}] and [{cont.out_features}, R]")
        out[cont.site] = (A, B)
    return out


def _site_dims(work: nn.Module) -> dict[str, tuple[int, int]]:
    from ..state import site_adapters

    return {c.site: (c.in_features, c.out_features) for _, _, c in site_adapters(work)}


# ----------------------------------------------------------------------------- builder


def _write_layout_adapter(path: Path, dims: Mapping[str, tuple[int, int]]) -> dict[int, str]:
    """A PEFT LoRA (rank 1, scaling 1) over ``dims``' sites; site i's A and B are filled with i+1.

    The codes are small integers, exact in fp16 too, so they survive the builder's casts and
    identify each site's constants in the built graph whatever the builder names them.
    """
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    tensors, codes = {}, {}
    for i, (site, (fi, fo)) in enumerate(sorted(dims.items())):
        code = i + 1
        if code > 2048:
            raise AdapterError(f"{len(dims)} adaptable sites: more than the 2048 the layout codes can tell apart "
                               f"in fp16")
        codes[code] = site
        tensors[f"base_model.model.{site}.lora_A.weight"] = torch.full((1, fi), float(code))
        tensors[f"base_model.model.{site}.lora_B.weight"] = torch.full((fo, 1), float(code))
    save_file(tensors, str(path / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1, "lora_alpha": 1, "lora_dropout": 0.0,
           "target_modules": sorted(dims), "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
           "base_model_name_or_path": None, "use_dora": False, "use_rslora": False}
    (path / "adapter_config.json").write_text(json.dumps(cfg, indent=2))
    return codes


def _lora_node_names(sites: Sequence[str]) -> list[str]:
    """The builder's node names of the LoRA MatMuls of ``sites`` (``model.layers.3.self_attn.q_proj``
    -> ``/model/layers.3/attn/q_proj/lora_A/MatMul``), to keep them float in int4 builds; the
    result is checked afterwards (a quantized LoRA MatMul is an error, not a silent int4 adapter)."""
    out = []
    for s in sites:
        m = re.search(r"layers\.(\d+)\.(.+)$", s)
        if not m:
            continue
        rest = m.group(2).replace("self_attn.", "attn.").split(".")
        base = f"/model/layers.{m.group(1)}/" + "/".join(rest)
        out += [f"{base}/lora_A/MatMul", f"{base}/lora_B/MatMul"]
    return out


def _run_builder(hf_dir: Path, out: Path, precision: str, device: str, extra: Mapping[str, str], log: Path) -> None:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out), "-p",
           precision, "-e", device, "-c", str(out.parent / "builder_cache")]
    if extra:
        cmd += ["--extra_options", *(f"{k}={v}" for k, v in extra.items())]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    with open(log, "w") as f:
        # A subprocess: the builder appends to sys.path, prints progress bars and keeps
        # module-level state; none of that should leak into the caller's process.
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0 or not (out / "genai_config.json").is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise AdapterError(f"the onnxruntime-genai builder failed (exit {rc}) on {hf_dir} "
                           f"(-p {precision} -e {device}); its last lines:\n{tail}")


# ----------------------------------------------------------------------------- graph surgery


def _np_dtype(elem_type: int) -> np.dtype:
    import onnx

    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def _code_of(t: np.ndarray, what: str) -> int:
    v = np.unique(t.astype(np.float64))
    if v.size != 1 or v[0] != round(v[0]) or v[0] < 1:
        raise AdapterError(f"the builder changed the layout LoRA constant {what} (values {v[:4]}); this "
                           f"onnxruntime-genai build transforms LoRA weights in a way peftcompile does not support")
    return int(v[0])


def _make_swappable(out: Path, codes: Mapping[int, str], dims: Mapping[str, tuple[int, int]],
                    filename: str = "model.onnx") -> dict[str, dict]:
    """Turn the builder's baked LoRA constants into graph inputs with zero-size defaults.

    Returns site -> {"A": input name ([in, R]), "B": input name ([R, out]), "in", "out", "dtype"}.
    The model is read without its external data (only the small LoRA constants are read), and
    saved next to the untouched ``.data`` file.
    """
    import onnx
    from onnx import helper, numpy_helper

    path = out / filename
    m = onnx.load(str(path), load_external_data=False)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    quantized = sorted(n for n in inits if re.search(r"\.lora_[AB]\.MatMul\.weight_", n))
    if quantized:
        raise AdapterError(f"the builder quantized the LoRA MatMuls ({quantized[:2]} ...): their node names are not "
                           f"the ones peftcompile keeps float for this architecture; use precision='fp32'")
    pairs = {}
    for name, t in inits.items():
        if not name.endswith(_LORA_A):
            continue
        b_name = name[: -len(_LORA_A)] + _LORA_B
        if b_name not in inits:
            raise AdapterError(f"the builder's graph has {name} without {b_name}")
        a = numpy_helper.to_array(t, base_dir=str(out))
        b = numpy_helper.to_array(inits[b_name], base_dir=str(out))
        code = _code_of(a, name)
        if _code_of(b, b_name) != code or code not in codes:
            raise AdapterError(f"the builder's LoRA constants {name} / {b_name} do not belong to one layout site")
        site = codes[code]
        if site in pairs:
            raise AdapterError(f"site {site} has two LoRA pairs in the builder's graph ({pairs[site]['A']}, {name}); "
                               f"fused projections are not supported")
        fi, fo = dims[site]
        if a.shape != (fi, 1) or b.shape != (1, fo):
            raise AdapterError(f"site {site} ([{fo}, {fi}]): the builder's LoRA constants have shapes {a.shape}, "
                               f"{b.shape}; this projection is split or fused in the genai graph (not supported)")
        pairs[site] = {"A": name, "B": b_name, "in": fi, "out": fo, "dtype": str(_np_dtype(t.data_type))}
    missing = sorted(set(dims) - set(pairs))
    if missing:
        raise AdapterError(f"the onnxruntime-genai builder does not apply LoRA at {missing[:6]}"
                           f"{' ...' if len(missing) > 6 else ''}; exclude these sites from the adapters (the builder "
                           f"adapts the decoder layers' attention and MLP projections)")
    # Initializers of the same name as a graph input are its default; the builder's value_info
    # pins rank 1 on the tensors and on the LoRA MatMul outputs: drop those entries.
    drop_vi = set()
    lora_inputs = {p["A"] for p in pairs.values()} | {p["B"] for p in pairs.values()}
    for node in g.node:
        if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in lora_inputs:
            drop_vi.update(node.output)
    keep_vi = [v for v in g.value_info if v.name not in lora_inputs and v.name not in drop_vi]
    del g.value_info[:]
    g.value_info.extend(keep_vi)
    keep_init = [t for t in g.initializer if t.name not in lora_inputs]
    del g.initializer[:]
    g.initializer.extend(keep_init)
    for j, (site, p) in enumerate(sorted(pairs.items())):
        dt = np.dtype(p["dtype"])
        elem = helper.np_dtype_to_tensor_dtype(dt)
        rank = f"lora_rank_{j}"  # one symbolic rank per pair (see the module docstring)
        g.initializer.append(numpy_helper.from_array(np.zeros((p["in"], 0), dt), p["A"]))
        g.initializer.append(numpy_helper.from_array(np.zeros((0, p["out"]), dt), p["B"]))
        g.input.append(helper.make_tensor_value_info(p["A"], elem, [p["in"], rank]))
        g.input.append(helper.make_tensor_value_info(p["B"], elem, [rank, p["out"]]))
    tmp = path.with_suffix(".onnx.tmp")
    onnx.save_model(m, str(tmp))  # external data references stay as they are
    os.replace(tmp, path)
    return pairs


# ----------------------------------------------------------------------------- adapter files


def _write_adapter(out: Path, name: str, lora: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                   inputs: Mapping[str, dict], spec: Any, source: Path, fingerprint: str) -> Path:
    from .formats import write_ort_adapter

    tensors, sites = {}, {}
    for site, (A, B) in lora.items():
        p = inputs[site]
        dt = np.dtype(p["dtype"])
        # the builder's layout: x @ A_g @ B_g with A_g = A.T [in, R], B_g = B.T [R, out] (scaling in B)
        tensors[p["A"]] = np.ascontiguousarray(A.t().numpy().astype(dt))
        tensors[p["B"]] = np.ascontiguousarray(B.t().numpy().astype(dt))
        sites[site] = {"A": p["A"], "B": p["B"], "rank": int(A.shape[0]), "in": p["in"], "out": p["out"]}
    file = write_ort_adapter(out / f"{name}{ORT_ADAPTER_SUFFIX}", tensors)
    meta = {"format": ADAPTER_FORMAT, "adapter": name, "spec": spec.to_dict(), "method": spec.method.to_dict(),
            "sites": sites, "base_fingerprint": fingerprint, "source": str(source),
            "tensors": {k: [list(v.shape), str(v.dtype)] for k, v in tensors.items()}}
    (out / f"{name}{SPEC_SUFFIX}").write_text(json.dumps(meta, indent=2))
    return file


def _folder_size(out: Path, filename: str = "model.onnx") -> int:
    return sum(p.stat().st_size for p in out.iterdir() if p.name.startswith(filename))


# ----------------------------------------------------------------------------- the export


def to_genai(
    model_or_hf_dir: nn.Module | str | Path,
    adapters: Mapping[str, str | Path] | None,
    out_dir: str | Path,
    *,
    precision: str = "fp32",
    device: str = "cpu",
    merged: bool = False,
    tokenizer: Any = None,
    overwrite: bool = False,
    extra_options: Mapping[str, str] | None = None,
) -> GenaiExport:
    """Build an onnxruntime-genai model folder from a base model and peftcompile/PEFT adapters.

    model_or_hf_dir: an HF ``*ForCausalLM`` folder with tokenizer files, or the model object
        (then pass ``tokenizer``). adapters: {name: adapter folder} (``save_adapters`` or PEFT
        ``save_pretrained``; LoRA, GraLoRA, RaSA). Unmerged (default): one base graph whose
        LoRA tensors are inputs + ``<name>.onnx_adapter`` / ``<name>.adapter.json`` per adapter,
        switched at run time with ``og.Adapters`` (see :class:`GenaiAdapters`). ``merged=True``:
        exactly one adapter, folded into the weights. precision/device: a builder target
        (:data:`SUPPORTED_TARGETS`); int4 keeps the LoRA MatMuls float. ``out_dir`` must not exist
        unless ``overwrite=True``; it is written atomically (temporary sibling, then a rename).
    """
    og = _require_genai()
    _check_target(precision, device)
    adapters = dict(adapters or {})
    for n in adapters:
        _check_name(n)
    if merged and len(adapters) != 1:
        raise AdapterError(f"merged=True folds exactly one adapter into the weights; got {len(adapters)} "
                           f"({sorted(adapters)}): export one folder per adapter, or merged=False to switch them")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise AdapterError(f"{out_dir} already exists; pass overwrite=True (CLI: --overwrite) or another folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        hf_dir, base, arch = _load_base(model_or_hf_dir, tokenizer, tmp)
        fingerprint = _fingerprint(base)
        work = _read_adapters(base, adapters)  # every adapter checked before anything is built
        from ..state import state_of

        specs = dict(state_of(work).specs) if adapters else {}
        build = tmp / "genai"
        extra = dict(extra_options or {})
        res = GenaiExport(out_dir, merged, precision, device, arch, fingerprint)
        if merged:
            import peftcompile as pc

            (name,) = adapters
            pc.set_active(work, name)
            plain = pc.merge_and_unload(work)
            merged_dir = tmp / "hf_merged"
            plain.save_pretrained(merged_dir)
            for f in hf_dir.iterdir():  # tokenizer and generation files travel with the weights
                if f.is_file() and not (merged_dir / f.name).exists() and not f.name.endswith(
                        (".safetensors", ".bin")):
                    shutil.copy2(f, merged_dir / f.name)
            _run_builder(merged_dir, build, precision, device, extra, tmp / "builder.log")
        else:
            loras = {n: _as_lora(work, n) for n in adapters}
            dims = _site_dims(work)
            if dims:
                codes = _write_layout_adapter(tmp / "layout_adapter", dims)
                extra["adapter_path"] = str(tmp / "layout_adapter")
                if precision == "int4":
                    excl = _lora_node_names(sorted(dims))
                    if extra.get("nodes_to_exclude"):
                        excl = [*str(extra["nodes_to_exclude"]).split(","), *excl]
                    extra["nodes_to_exclude"] = ",".join(excl)
            _run_builder(hf_dir, build, precision, device, extra, tmp / "builder.log")
            inputs = _make_swappable(build, codes, dims) if dims else {}
            res.adapter_inputs = inputs
            for n, lora in loras.items():
                res.adapters[n] = _write_adapter(build, n, lora, inputs, specs[n], Path(adapters[n]), fingerprint)
        manifest = {"format": FORMAT, "merged": merged, "precision": precision, "device": device,
                    "architecture": arch, "base_fingerprint": fingerprint, "onnxruntime_genai": og.__version__,
                    "adapter_inputs": res.adapter_inputs,
                    "adapters": {n: f"{n}{ORT_ADAPTER_SUFFIX}" for n in res.adapters},
                    "merged_adapter": ({"name": next(iter(adapters)), "spec": next(iter(specs.values())).to_dict()}
                                       if merged else None)}
        (build / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        res.sizes = {"base": _folder_size(build), **{n: p.stat().st_size for n, p in res.adapters.items()}}
        _replace_dir(build, out_dir)
        res.adapters = {n: out_dir / p.name for n, p in res.adapters.items()}
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder into place; an existing ``dst`` (overwrite) is swapped out first."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        try:
            os.replace(src, dst)
        except OSError:
            os.replace(old, dst)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


# ----------------------------------------------------------------------------- run time


def read_manifest(model_dir: str | Path) -> dict:
    """The ``peftcompile_genai.json`` of a folder written by :func:`to_genai`."""
    f = Path(model_dir) / MANIFEST_NAME
    if not f.is_file():
        raise AdapterError(f"{model_dir} was not written by peftcompile.export.to_genai (no {MANIFEST_NAME})")
    try:
        return json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{f} is not valid JSON ({e})") from None


class GenaiAdapters:
    """``og.Adapters`` for a :func:`to_genai` folder, checking each adapter before loading it.

    >>> ad = GenaiAdapters(model_dir)            # og.Model(model_dir) unless model= is given
    >>> ad.load("a")                             # model_dir/a.onnx_adapter (+ a.adapter.json)
    >>> gen = og.Generator(ad.model, params); ad.activate(gen, "a")
    """

    def __init__(self, model_dir: str | Path, model: Any = None) -> None:
        og = _require_genai()
        self.dir = Path(model_dir)
        self.manifest = read_manifest(self.dir)
        if self.manifest.get("merged"):
            raise AdapterError(f"{self.dir} is a merged export (no adapter inputs); export with merged=False to "
                               f"switch adapters")
        self.model = model if model is not None else og.Model(str(self.dir))
        self.adapters = og.Adapters(self.model)
        self.loaded: dict[str, dict] = {}

    def check(self, file: str | Path) -> dict:
        """The adapter's spec JSON, after checking it and its tensors against this model folder."""
        import onnxruntime as ort

        file = Path(file)
        spec_file = file.with_name(file.name.removesuffix(ORT_ADAPTER_SUFFIX) + SPEC_SUFFIX)
        if not file.is_file():
            raise AdapterError(f"adapter file not found: {file}")
        if not spec_file.is_file():
            raise AdapterError(f"{file} has no {spec_file.name} next to it (written by to_genai); without it the "
                               f"adapter cannot be checked against this model")
        meta = json.loads(spec_file.read_text())
        if meta.get("format") != ADAPTER_FORMAT:
            raise AdapterError(f"{spec_file} is not a peftcompile genai adapter description")
        if meta.get("base_fingerprint") != self.manifest["base_fingerprint"]:
            raise AdapterError(f"{file} was converted for another base model (fingerprint "
                               f"{str(meta.get('base_fingerprint'))[:12]} vs this folder's "
                               f"{self.manifest['base_fingerprint'][:12]}); re-export it with to_genai on this base")
        inputs = self.manifest["adapter_inputs"]
        try:
            fmt = ort.AdapterFormat.read_adapter(str(file))
            # get_parameters() returns views into ``fmt``'s buffers: copy while it is alive
            params = {k: np.array(v.numpy(), copy=True) for k, v in fmt.get_parameters().items()}
            del fmt
        except Exception as e:  # noqa: BLE001 - onnxruntime raises bare RuntimeErrors
            raise AdapterError(f"{file} is not a readable .onnx_adapter file ({e})") from None
        by_name = {p["A"]: (site, "A") for site, p in inputs.items()} | {p["B"]: (site, "B") for site, p in
                                                                        inputs.items()}
        bad = []
        for k, v in params.items():
            if k not in by_name:
                bad.append(f"{k}: not an adapter input of this model")
                continue
            site, ab = by_name[k]
            p = inputs[site]
            want_fixed = (0, p["in"]) if ab == "A" else (1, p["out"])
            if v.ndim != 2 or v.shape[want_fixed[0]] != want_fixed[1] or str(v.dtype) != p["dtype"]:
                want = f"[in={p['in']}, R]" if ab == "A" else f"[R, out={p['out']}]"
                bad.append(f"{k}: {v.shape} {v.dtype}, model wants {want} {p['dtype']}")
        for site, p in inputs.items():
            if (p["A"] in params) != (p["B"] in params):
                bad.append(f"{site}: only one of its A/B tensors is in the file")
            elif p["A"] in params and params[p["A"]].shape[1] != params[p["B"]].shape[0]:
                bad.append(f"{site}: rank of A {params[p['A']].shape[1]} != rank of B {params[p['B']].shape[0]}")
        recorded = set(meta.get("tensors", {}))
        if recorded != set(params):
            bad.append(f"tensors differ from {spec_file.name}: {sorted(recorded ^ set(params))[:4]}")
        if bad:
            raise AdapterError(f"{file} does not fit {self.dir}: " + "; ".join(bad[:6]))
        return meta

    def load(self, adapter: str | Path, name: str | None = None) -> str:
        """Check and load an adapter (a name in the folder, or a ``.onnx_adapter`` path); returns its name."""
        p = Path(adapter)
        file = p if p.suffix == ORT_ADAPTER_SUFFIX else self.dir / f"{adapter}{ORT_ADAPTER_SUFFIX}"
        meta = self.check(file)
        name = name or meta["adapter"]
        if name in self.loaded:
            raise AdapterError(f"an adapter named {name!r} is already loaded; pass name=")
        self.adapters.load(str(file), name)
        self.loaded[name] = meta
        return name

    def activate(self, generator: Any, name: str) -> None:
        """``generator.set_active_adapter`` for a loaded adapter (before the first token)."""
        if name not in self.loaded:
            raise AdapterError(f"adapter {name!r} is not loaded; loaded: {sorted(self.loaded)}")
        generator.set_active_adapter(self.adapters, name)


def greedy(model: Any, ids: Sequence[int], max_new_tokens: int, adapters: GenaiAdapters | None = None,
           adapter: str | None = None) -> list[int]:
    """Greedy generation with onnxruntime-genai: prompt + new tokens (stops at EOS or the length)."""
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + max_new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    if adapter is not None:
        if adapters is None:
            raise AdapterError("adapter= needs adapters= (a GenaiAdapters with it loaded)")
        adapters.activate(gen, adapter)
    gen.append_tokens(np.asarray([list(ids)], dtype=np.int32))
    while not gen.is_done():
        gen.generate_next_token()
    return [int(t) for t in gen.get_sequence(0)]
