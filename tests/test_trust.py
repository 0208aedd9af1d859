"""No silent failure (issue #11, model side): every misuse raises AdapterError before anything
changes, merge/disable state is restored exactly, checkpoints are written atomically.

``test_bad_calls_leave_model_and_files_unchanged`` is the property-style table: for each bad
call it snapshots the model (state_dict hash, module names, adapter state, requires_grad,
one forward output) and the checkpoint folder (names + sha256), and asserts the call raises
AdapterError and that both are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import peftcompile as pc
from peftcompile.errors import AdapterTypeError, AdapterWarning
from peftcompile.state import site_adapters, state_of

from conftest import MLP, randomize_adapters_, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore:.*has a single site")

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------- snapshots
def model_snapshot(model: nn.Module, x: torch.Tensor) -> dict:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    st = state_of(model)
    with torch.no_grad():
        out = model(x).clone()
    return {
        "state_dict": h.hexdigest(),
        "modules": [n for n, _ in model.named_modules()],
        "adapters": None if st is None else (sorted(st.specs), st.active, sorted(st.units)),
        "sites": [(c.site, tuple(c), c.active, c.merged, c.disabled) for _, _, c in site_adapters(model)],
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": [m.training for m in model.modules()],
        "out": out,
    }


def assert_same(a: dict, b: dict) -> None:
    for k in a:
        if k == "out":
            assert torch.equal(a[k], b[k]), "forward output changed"
        else:
            assert a[k] == b[k], f"{k} changed"


def folder_snapshot(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()} if path.exists() else {}


def adapted_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = MLP().eval()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=4, alpha=8), targets="all-linear"))
    randomize_adapters_(m, seed=seed)
    return m


# ----------------------------------------------------------------- merge / disable state
def test_load_into_a_merged_adapter_is_refused_and_unmerge_stays_exact(tmp_path):
    m = adapted_mlp()
    base_w = m.fc1.weight.detach().clone()
    other = adapted_mlp(seed=1)
    pc.save_adapters(other, tmp_path / "other")
    pc.merge(m)
    x = torch.randn(3, 16)
    snap = model_snapshot(m, x)
    with pytest.raises(pc.AdapterError, match="is merged into the base weights.*unmerge"):
        pc.load_adapters(m, tmp_path / "other")
    assert_same(snap, model_snapshot(m, x))
    pc.unmerge(m)
    torch.testing.assert_close(m.fc1.weight, base_w, rtol=0, atol=1e-6)


def test_nested_disabled_restores_each_level():
    m = adapted_mlp()
    x = torch.randn(3, 16)
    with torch.no_grad():
        on = m(x)
        with pc.disabled(m):
            off = m(x)
            with pc.disabled(m):
                torch.testing.assert_close(m(x), off)
            torch.testing.assert_close(m(x), off)  # the outer block is still disabled
        torch.testing.assert_close(m(x), on)
    assert not torch.allclose(on, off)


def test_disabled_remerges_exactly_what_was_merged():
    m = adapted_mlp()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2, alpha=4), targets=["fc1"]), name="b")
    randomize_adapters_(m, seed=3)
    pc.set_active(m, "default")
    pc.merge(m)  # default merged
    pc.set_active(m, ["default", "b"])  # b active, not merged
    x = torch.randn(3, 16)
    with torch.no_grad():
        before = m(x)
        w = m.fc1.weight.detach().clone()
        with pc.disabled(m):
            pass
        after = m(x)
    assert m.fc1.peftcompile.merged == ("default",)
    torch.testing.assert_close(m.fc1.weight, w, rtol=0, atol=1e-6)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


def test_training_a_merged_model_warns_to_unmerge():
    m = adapted_mlp().train()
    pc.merge(m)
    with pytest.warns(AdapterWarning, match="unmerge"):
        out = m(torch.randn(2, 16))
    with pytest.raises(pc.AdapterError, match="merged into the base weight.*unmerge"):
        out.sum().backward()
    pc.unmerge(m)
    with warnings.catch_warnings():
        warnings.simplefilter("error", AdapterWarning)
        m(torch.randn(2, 16)).sum().backward()
    assert m.fc1.peftcompile["default"].lora_B.grad is not None


def test_adapt_while_an_adapter_is_merged_is_refused_before_any_change():
    m = adapted_mlp()
    pc.merge(m)
    x = torch.randn(3, 16)
    snap = model_snapshot(m, x)
    with pytest.raises(pc.AdapterError, match="merged into the base weights.*unmerge"):
        pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["fc1"]), name="b")
    assert_same(snap, model_snapshot(m, x))


def test_save_with_several_active_needs_a_name(tmp_path):
    m = adapted_mlp()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["fc1"]), name="b")
    pc.set_active(m, ["default", "b"])
    with pytest.raises(pc.AdapterError, match="needs name="):
        pc.save_adapters(m, tmp_path / "a")
    assert not (tmp_path / "a").exists()
    pc.save_adapters(m, tmp_path / "a", name="b")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["adapter"] == "b"


# ----------------------------------------------------------------- names and targets
@pytest.mark.parametrize("name", ["keys", "forward", "training", "to", "a.b", "", "with space", 3])
def test_reserved_or_malformed_adapter_names(name):
    m = MLP().eval()
    x = torch.randn(2, 16)
    snap = model_snapshot(m, x)
    with pytest.raises(pc.AdapterError):
        pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets="all-linear"), name=name)
    assert_same(snap, model_snapshot(m, x))
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets="all-linear"), name="ok")  # the model is still usable
    assert {c.site for _, _, c in site_adapters(m)} == {"fc1", "fc2"}


class Nested(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.sub = nn.Module()
        self.sub.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.sub.fc(self.fc(x))


def test_recorded_site_names_are_exact_not_suffixes(tmp_path):
    m = Nested()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets="all-linear"), placement=pc.Placement(["fc"]))
    assert [c.site for _, _, c in site_adapters(m)] == ["fc"]
    pc.save_adapters(m, tmp_path / "a")
    fresh = pc.load_adapters(Nested(), tmp_path / "a")
    assert [c.site for _, _, c in site_adapters(fresh)] == ["fc"]


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(self.norm(self.conv(x).mean((2, 3))))


def test_target_naming_a_non_linear_module_is_an_error():
    m = ConvNet()
    with pytest.raises(pc.AdapterError, match=r"target 'norm' names \['LayerNorm'\]"):
        pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["norm", "fc"]))
    assert state_of(m) is None
    # an nn.Conv2d is a site (tests/test_conv.py, test_block_kinds.py) where the method's own check passes:
    # GraLoRA's k must divide in = C_in * prod(kernel) = 27, refused by name
    with pytest.raises(pc.AdapterError, match=r"conv: GraLoRA k=2 must divide in_features=27"):
        pc.adapt(m, pc.AdapterSpec(pc.GraLoRA(r=2, k=2), targets=["conv", "fc"]))
    assert state_of(m) is None
    with pytest.warns(AdapterWarning, match="'fcc' matched no site"):
        pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["fcc", "fc"]))


class WithMHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: not traceable whole, so its children are visited
            x = x * 2
        return self.fc(self.attn(x, x, x)[0])


def test_multihead_attention_out_proj_is_never_a_silent_site():
    m = WithMHA()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets="all-linear"))
    assert [c.site for _, _, c in site_adapters(m)] == ["fc"]
    m2 = WithMHA()
    with pytest.raises(pc.AdapterError, match="MultiheadAttention reads its out_proj weight directly"):
        pc.adapt(m2, pc.AdapterSpec(pc.LoRA(r=2), targets=["out_proj"]))
    assert state_of(m2) is None


class Flagged(nn.Module):
    """Reads a flag and a dtype in forward: a whole-module trace would freeze both."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.twice = True
        self.dtype = torch.float32

    def forward(self, x):
        y = self.fc(x.to(self.dtype))
        return y * 2 if self.twice else y


def test_python_attributes_read_in_forward_are_not_frozen():
    m, ref = Flagged(), Flagged()
    ref.load_state_dict(m.state_dict())
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets="all-linear"))
    x = torch.randn(2, 4)
    for flag in (True, False):
        m.twice = ref.twice = flag
        torch.testing.assert_close(m(x), ref(x))
    m.dtype = ref.dtype = torch.float64
    m.to(torch.float64)
    ref.to(torch.float64)
    torch.testing.assert_close(m(x), ref(x))


def test_a_peft_model_is_not_adapted_again():
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(MLP(), LoraConfig(r=2, target_modules=["fc1"]))
    with pytest.raises(pc.AdapterError, match="already wrapped by PEFT"):
        pc.adapt(pm, pc.AdapterSpec(pc.LoRA(r=2), targets="all-linear"))
    assert state_of(pm) is None


def test_target_lists_of_non_strings_raise_adapter_type_error():
    with pytest.raises(AdapterTypeError, match=r"got \[1\]"):
        pc.AdapterSpec(pc.LoRA(r=2), targets=["q_proj", 1])
    with pytest.raises(TypeError):  # also a TypeError for callers that catch that
        pc.AdapterSpec(pc.LoRA(r=2), targets=[None])


# ----------------------------------------------------------------- weights
class TiedFunctional(nn.Module):
    """An LM-style head as F.linear on the embedding's own weight."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 8)

    def forward(self, ids):
        return F.linear(self.fc(self.emb(ids)), self.emb.weight)


class TiedHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.fc(self.emb(ids)))


@pytest.mark.parametrize("cls,site", [(TiedFunctional, "emb"), (TiedHead, "head")])
def test_tied_weights_are_left_out_of_all_linear_and_never_merged(cls, site):
    m = cls()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets="all-linear"))
    assert [c.site for _, _, c in site_adapters(m)] == ["fc"]
    m = cls()
    emb = m.emb.weight.detach().clone()
    with pytest.warns(AdapterWarning, match="merge\\(\\) will refuse"):
        pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=[site, "fc"]))
    randomize_adapters_(m)
    ids = torch.randint(0, 20, (2, 5))
    snap = model_snapshot(m, ids)
    for call in (pc.merge, pc.merge_and_unload):
        with pytest.raises(pc.AdapterError, match="cannot merge into"):
            call(m)
        assert_same(snap, model_snapshot(m, ids))
    assert torch.equal(m.emb.weight, emb)


def test_trainable_module_that_holds_a_site_is_refused():
    m = MLP()
    with pytest.raises(pc.AdapterError, match="hold adapted sites"):
        pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["fc1", "fc2"], trainable=["fc2"]))
    assert state_of(m) is None


def test_load_into_a_meta_model_is_refused(tmp_path):
    pc.save_adapters(adapted_mlp(), tmp_path / "a")
    with torch.device("meta"):
        m = MLP()
    with pytest.raises(pc.AdapterError, match="meta device"):
        pc.load_adapters(m, tmp_path / "a")
    assert state_of(m) is None


@pytest.mark.parametrize("alpha", [0, float("nan"), float("inf"), -float("inf")])
def test_bad_alpha_is_refused(alpha):
    for make in (lambda: pc.LoRA(r=2, alpha=alpha), lambda: pc.GraLoRA(r=2, k=1, alpha=alpha),
                 lambda: pc.RaSA(r=2, k=1, alpha=alpha)):
        with pytest.raises(pc.AdapterError, match="alpha must be a finite non-zero number"):
            make()


def _edit_config(path: Path, fn) -> None:
    cfg = json.loads((path / "adapter_config.json").read_text())
    fn(cfg)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


# ----------------------------------------------------------------- PEFT allow-list
def _peft_checkpoint(tmp_path: Path, **cfg_edits) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    pm = get_peft_model(MLP(), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1"]))
    out = tmp_path / "peft"
    pm.save_pretrained(out)
    _edit_config(out, lambda c: c.update(cfg_edits))
    return out


@pytest.mark.parametrize("edit,match", [
    ({"use_dora": True}, "use_dora=True"),
    ({"alora_invocation_tokens": [1, 2]}, "alora_invocation_tokens"),
    ({"lora_bias": True}, r"missing.*fc1\.lora_B_bias"),  # supported, but the file lacks B's bias
    ({"layer_replication": [[0, 1]]}, "layer_replication"),
    ({"bias": "all"}, r"missing.*trainable\.fc\d\.bias"),  # supported, but the file lacks the trained biases
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
    ({"some_future_option": 1}, "some_future_option"),
])
def test_peft_checkpoint_options_we_do_not_implement_are_refused(tmp_path, edit, match):
    """Options we do not implement, and options we do whose tensors the file does not hold."""
    path = _peft_checkpoint(tmp_path, **edit)
    m = MLP()
    with pytest.raises(pc.AdapterError, match=match):
        pc.load_peft_adapter(m, path)
    assert state_of(m) is None


def test_plain_peft_checkpoint_still_loads(tmp_path):
    path = _peft_checkpoint(tmp_path)
    pc.load_peft_adapter(MLP(), path)


# ----------------------------------------------------------------- the table
def _bad_calls(tmp_path: Path):
    """(label, call(model, folder)) pairs that must raise AdapterError and change nothing."""
    good = tmp_path / "good"
    pc.save_adapters(adapted_mlp(seed=5), good)

    def variant(name, edit=None, weights=None):
        d = tmp_path / name
        d.mkdir(exist_ok=True)
        for f in good.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        if edit:
            _edit_config(d, edit)
        if weights is not None:
            from safetensors.torch import save_file

            save_file(weights, str(d / "adapter_model.safetensors"))
            _edit_config(d, lambda c: c.pop("weights_sha256"))
        return d

    from safetensors.torch import load_file

    int_weights = {k: v.to(torch.int64) for k, v in load_file(str(good / "adapter_model.safetensors")).items()}
    no_json = tmp_path / "no_json"
    no_json.mkdir()
    (no_json / "adapter_config.json").write_text("{not json")
    second = pc.AdapterSpec(pc.LoRA(r=2), targets=["fc1"])

    def two_active(m, f):
        pc.adapt(m, second, name="second")
        pc.set_active(m, ["default", "second"])

    def merged_then_other(m, f):
        pc.adapt(m, second, name="c")
        pc.set_active(m, "default")
        pc.merge(m)

    merge = lambda m, f: pc.merge(m)  # noqa: E731
    # (label, legal steps before the bad call or None, the bad call)
    return [
        ("load: missing 'sites'", None, lambda m, f: pc.load_adapters(m, variant("nosites", lambda c: c.pop("sites")))),
        ("load: missing 'spec'", None, lambda m, f: pc.load_adapters(m, variant("nospec", lambda c: c.pop("spec")))),
        ("load: alpha NaN in file", None, lambda m, f: pc.load_adapters(
            m, variant("nan", lambda c: c["spec"]["method"].update(alpha=float("nan"))))),
        ("load: unknown method field", None, lambda m, f: pc.load_adapters(
            m, variant("extra", lambda c: c["spec"]["method"].update(use_magic=True)))),
        ("load: unknown spec field", None, lambda m, f: pc.load_adapters(
            m, variant("extraspec", lambda c: c["spec"].update(layers=[1])))),
        ("load: unknown method", None, lambda m, f: pc.load_adapters(
            m, variant("unk", lambda c: c["spec"]["method"].update(method="dora")))),
        ("load: adapter name 'keys' in file", None, lambda m, f: pc.load_adapters(
            m, variant("keys", lambda c: c.update(adapter="keys")), name=None)),
        ("load: int64 tensors", None, lambda m, f: pc.load_adapters(m, variant("int", weights=int_weights),
                                                                     name="other")),
        ("load: malformed JSON", None, lambda m, f: pc.load_adapters(m, no_json)),
        ("load: not a directory", None, lambda m, f: pc.load_adapters(m, tmp_path / "nowhere")),
        ("load: PEFT dir to load_adapters", None, lambda m, f: pc.load_adapters(
            m, variant("peftlike", lambda c: c.update(peft_type="LORA")))),
        ("load: into a merged adapter", merge, lambda m, f: pc.load_adapters(m, good)),
        ("save: path is a file", None, lambda m, f: pc.save_adapters(m, f / "adapter_config.json")),
        ("save: several active, no name", two_active, lambda m, f: pc.save_adapters(m, f)),
        ("adapt: reserved name", None, lambda m, f: pc.adapt(m, second, name="keys")),
        ("adapt: duplicate name", None, lambda m, f: pc.adapt(m, second)),
        ("adapt: target matches nothing", None, lambda m, f: pc.adapt(
            m, pc.AdapterSpec(pc.LoRA(r=2), targets=["nope"]), name="b")),
        ("adapt: trainable holds a site", None, lambda m, f: pc.adapt(
            m, pc.AdapterSpec(pc.LoRA(r=2), targets=["fc1"], trainable=["fc1"]), name="b")),
        ("adapt: while merged", merge, lambda m, f: pc.adapt(m, second, name="b")),
        ("set_active: unknown", None, lambda m, f: pc.set_active(m, "nope")),
        ("set_active: empty", None, lambda m, f: pc.set_active(m, [])),
        ("set_active: away from merged", merged_then_other, lambda m, f: pc.set_active(m, "c")),
        ("adapter_names: one name too few", None, lambda m, f: m(torch.randn(3, 16), adapter_names=["default"] * 2)),
        ("adapter_names: unknown name", None, lambda m, f: m(torch.randn(3, 16),
                                                               adapter_names=["default", "nope", "__base__"])),
        ("adapter_names: a string", None, lambda m, f: m(torch.randn(3, 16), adapter_names="default")),
        ("adapter_names: while merged", merge, lambda m, f: m(torch.randn(3, 16), adapter_names=["default"] * 3)),
        ("adapter_names: in training mode", lambda m, f: m.train(), lambda m, f: m(torch.randn(3, 16),
                                                                                 adapter_names=["default"] * 3)),
        ("adapt: name '__base__'", None, lambda m, f: pc.adapt(m, second, name="__base__")),
    ]


def test_bad_calls_leave_model_and_files_unchanged(tmp_path):
    cases = _bad_calls(tmp_path)
    x = torch.randn(3, 16)
    folder = tmp_path / "target"
    silent = []
    for label, pre, bad in cases:
        m = adapted_mlp()
        pc.save_adapters(m, folder)
        if pre is not None:
            pre(m, folder)
        snap, files = model_snapshot(m, x), folder_snapshot(folder)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                bad(m, folder)
        except pc.AdapterError:
            pass
        else:
            silent.append(label)
            continue
        assert_same(snap, model_snapshot(m, x))
        assert folder_snapshot(folder) == files, label
    assert not silent, f"no AdapterError for: {silent}"
    assert len(cases) >= 20


# ----------------------------------------------------------------- crash safety
_CHILD = textwrap.dedent("""
    import os, sys, torch
    sys.path.insert(0, {tests!r})
    import peftcompile as pc
    from conftest import MLP, randomize_adapters_
    torch.manual_seed(0)
    m = MLP().eval()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=4, alpha=8), targets="all-linear"))
    randomize_adapters_(m, seed=2)   # the new weights; the folder holds seed 1's
    mode = {mode!r}
    if mode == "mid-weights":  # the weights' temporary file half written, then killed
        import peftcompile.io as io
        def half(file, data):
            file.write_bytes(data[: len(data) // 2])
            os._exit(9)
        io._write_tmp = half
    else:
        n_before_exit = {{"before-replace": 0, "between-replaces": 1}}[mode]
        real_replace = os.replace
        calls = [0]
        def replace(a, b):
            if calls[0] == n_before_exit:
                os._exit(9)
            calls[0] += 1
            real_replace(a, b)
        os.replace = replace
    pc.save_adapters(m, {path!r})
    os._exit(0)
""")


@pytest.mark.parametrize("mode", ["mid-weights", "before-replace", "between-replaces"])
def test_killed_save_leaves_the_previous_checkpoint_loadable(tmp_path, mode):
    torch.manual_seed(0)
    m = MLP().eval()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=4, alpha=8), targets="all-linear"))
    randomize_adapters_(m, seed=1)
    path = tmp_path / "ckpt"
    pc.save_adapters(m, path)
    x = torch.randn(3, 16)
    with torch.no_grad():
        want = m(x)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = _CHILD.format(tests=str(REPO / "tests"), mode=mode, path=str(path))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr[-2000:]
    torch.manual_seed(0)
    fresh = MLP().eval()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pc.load_adapters(fresh, path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, rtol=0, atol=0)
    if mode == "between-replaces":  # new weights already in place: the previous ones were kept and used
        assert any("interrupted" in str(i.message) for i in w)


def test_top_level_subpackages_are_reachable_lazily():
    code = "import peftcompile as pc; print(pc.export.to_onnx.__name__, pc.diffora.search.__name__)"
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["to_onnx", "search"]


def test_mixed_adapter_batch_hooks_travel_with_the_model_and_unload_removes_them():
    """``adapter_names`` is honoured (tests/test_mixed_batches.py), never swallowed: the hooks and
    HF's ``generate`` wrapper pickle and deep-copy with the model, and unload removes them."""
    import copy
    import pickle

    m = tiny_llama(num_hidden_layers=1).eval()
    pc.adapt(m, pc.AdapterSpec(pc.LoRA(r=2), targets=["q_proj"]))
    randomize_adapters_(m)
    ids = torch.randint(3, 100, (2, 5))
    want = m(input_ids=ids).logits
    for other in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
        got = other(input_ids=ids, adapter_names=["default", "__base__"]).logits
        torch.testing.assert_close(got[0], want[0])
        assert not torch.allclose(got[1], want[1])
        assert other.generate.module is other
        with pytest.raises(pc.AdapterError, match="adapter_names has 1 names but the batch has 2 rows"):
            other.generate(ids, max_new_tokens=1, adapter_names=["default"])
    pc.unload(m)
    m(input_ids=ids, adapter_names=None)
    assert not m._forward_pre_hooks and not m._forward_hooks and "generate" not in m.__dict__
