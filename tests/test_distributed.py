"""DDP and FSDP2 (2 gloo processes) against single-process training; sharded save/load; bad inputs.

One spawned run (tests/dist_worker.py) covers LoRA, GraLoRA and RaSA under DDP and FSDP2, so
the processes start once. Every spawned process has a hard timeout.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftcompile as pc
from peftcompile.distributed import unwrap

sys.path.insert(0, str(Path(__file__).parent))
import dist_worker as W

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 120
# fp32; the only differences are the order of the gradient reduction and of the loss means
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args: list[str], world: int = 2, timeout: float = TIMEOUT_S, torchrun: bool = False) -> list[str]:
    """Run ``args`` as ``world`` ranks (env:// rendezvous); kill all on timeout; return their outputs."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    procs = [subprocess.Popen(args, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{args} did not finish in {timeout}s")
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{outs[r][-4000:]}"
    return outs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ref_dir = tmp_path_factory.mktemp("ref")
    out = tmp_path_factory.mktemp("dist")
    torch.set_num_threads(1)
    ref = {m: W.train_reference(m, ref_dir) for m in W.METHODS}
    m = W.build_switch()
    ref["switch"] = W.switch_sequence(m, m)
    spawn([sys.executable, str(Path(W.__file__)), str(out), str(ref_dir)])
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return ref, ref_dir, out, ranks


def adapter_file(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "adapter_model.safetensors"))


@pytest.mark.parametrize("method", list(W.METHODS))
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_parity_with_single_process(runs, mode, method):
    ref, ref_dir, out, ranks = runs
    got = ranks[0][f"{mode}-{method}"]["losses"]
    assert ranks[1][f"{mode}-{method}"]["losses"] == got  # the global loss, identical on every rank
    assert got == pytest.approx(ref[method]["losses"], rel=LOSS_RTOL)
    assert got[-1] < got[0]  # it trained
    a, b = adapter_file(out / f"{mode}-{method}"), adapter_file(ref_dir / method)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=WEIGHT_ATOL, rtol=0, msg=k)
    # the same config; weights_sha256 fingerprints the file's bytes, and the adapters agree to
    # a tolerance (checked below), not bit for bit
    cfg = json.loads((out / f"{mode}-{method}" / "adapter_config.json").read_text())
    ref_cfg = json.loads((ref_dir / method / "adapter_config.json").read_text())
    assert cfg.pop("weights_sha256") and ref_cfg.pop("weights_sha256")
    assert cfg == ref_cfg


def test_switching_adapters_that_train_a_module_on_fsdp2_shards(runs):
    """Each adapter's copy of a trainable module is swapped into the FSDP2 shards (every rank keeps its
    slice; the outgoing values are gathered): same losses and outputs as one process."""
    ref, _, _, ranks = runs
    got, want = ranks[0]["fsdp2-switch"], ref["switch"]
    assert ranks[1]["fsdp2-switch"] == got
    for k in ("losses_a", "losses_b"):
        assert got[k] == pytest.approx(want[k], rel=LOSS_RTOL), k
    for k in ("probe_a", "probe_b", "probe_base"):
        torch.testing.assert_close(torch.tensor(got[k]), torch.tensor(want[k]), atol=1e-5, rtol=1e-5, msg=k)
    assert not torch.allclose(torch.tensor(got["probe_a"]), torch.tensor(got["probe_b"]), atol=1e-3)


@pytest.mark.parametrize("method", list(W.METHODS))
def test_frozen_base_never_reduced(runs, method):
    _, _, _, ranks = runs
    d = ranks[0][f"ddp-{method}"]
    assert d["reduced_per_step"] == d["trainable"] == d["summary_params"]  # DDP buckets: adapters only
    assert ranks[0][f"fsdp2-{method}"]["frozen_with_grad"] == 0


@pytest.mark.parametrize("method", list(W.METHODS))
def test_load_single_checkpoint_onto_shards(runs, method):
    """World size 1 -> 2: each rank keeps its slice; the model computes the single-process logits
    and saving it back gives the same file bit for bit."""
    ref, ref_dir, out, _ = runs
    torch.testing.assert_close(torch.load(out / f"fsdp2-load-{method}.pt"), ref[method]["logits"],
                               atol=1e-5, rtol=1e-5)
    a, b = adapter_file(out / f"fsdp2-resave-{method}"), adapter_file(ref_dir / method)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", list(W.METHODS))
def test_sharded_save_loads_single_process(runs, method):
    """World size 2 -> 1: the FSDP2 file loads into a plain model and reproduces the reference."""
    ref, _, out, _ = runs
    m = W.build(method).eval()
    pc.load_adapters(m, out / f"fsdp2-{method}")
    with torch.no_grad():
        torch.testing.assert_close(m(input_ids=W.probe_ids()).logits, ref[method]["logits"], atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def compiled(runs, tmp_path_factory):
    if os.environ.get("PEFTCOMPILE_TEST_DIST_COMPILE") != "1":
        pytest.skip("opt-in (PEFTCOMPILE_TEST_DIST_COMPILE=1): inductor compiles on 2 shared CPU cores take minutes")
    ref, ref_dir, _, _ = runs
    out = tmp_path_factory.mktemp("compiled")
    spawn([sys.executable, str(Path(W.__file__)), str(out), str(ref_dir), "compile"], timeout=900)
    return ref, ref_dir, out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("mode", W.COMPILED)
def test_compiled_inside_ddp_and_fsdp2(compiled, mode):
    """torch.compile(backend="peftcompile") around DDP (graph split at its buckets) and FSDP2: the
    same losses and adapter as eager single-process training, with the adapter regions fused."""
    ref, ref_dir, out, ranks = compiled
    got = ranks[0][f"compiled-{mode}"]
    assert got["losses"] == pytest.approx(ref["gralora"]["losses"], rel=1e-5)
    assert got["counters"].get("fused_gralora", 0) >= 3, got["counters"]  # adapter regions were lowered
    a, b = adapter_file(out / f"compiled-{mode}-gralora"), adapter_file(ref_dir / "gralora")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=k)


def test_bad_inputs_across_ranks(runs):
    _, _, _, ranks = runs
    r1 = ranks[1]
    assert r1["save_one_rank"] == "OK" and not r1["save_one_rank_wrote"]
    for r in ranks:
        assert r["mismatch"] == "OK" and not r["mismatch_wrote"]
        assert r["diverged"] == "OK" and not r["diverged_wrote"]
        assert r["merge_sharded"] == "OK"
        assert r["load_new_onto_shards"] == "OK"
        assert r["no_group"] == "OK" and not r["no_group_wrote"]


# ---------------------------------------------------------------- in-process: wrappers
class Wrapper(nn.Module):
    """Stands in for a wrapper unwrap() does not know: state is not found through it."""

    def __init__(self, m):
        super().__init__()
        self.inner = m


def test_wrappers_are_unwrapped(tmp_path):
    m = W.build("rasa").eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.normal_()
    compiled = torch.compile(m, backend="peftcompile")
    assert unwrap(compiled) is m
    pc.save_adapters(compiled, tmp_path / "a")
    fresh = W.build("rasa").eval()
    pc.load_adapters(torch.compile(fresh, backend="eager"), tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=W.probe_ids()).logits, m(input_ids=W.probe_ids()).logits,
                                   atol=0, rtol=0)
    assert pc.summary(compiled).adapter_params == pc.summary(m).adapter_params
    with pytest.raises(pc.AdapterError, match="has no peftcompile adapters"):
        pc.save_adapters(Wrapper(m), tmp_path / "b")
    assert not (tmp_path / "b").exists()
    plain = pc.merge_and_unload(compiled)
    assert plain is m and not hasattr(m, "peftcompile_shared")


def test_save_is_atomic_on_error(tmp_path):
    m = W.build("lora")
    (tmp_path / "file").write_text("x")
    with pytest.raises(pc.AdapterError, match="is a file"):
        pc.save_adapters(m, tmp_path / "file")
    pc.save_adapters(m, tmp_path / "ok")
    assert sorted(p.name for p in (tmp_path / "ok").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
