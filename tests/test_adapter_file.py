"""The native adapter file round-trips exactly; every malformed file is rejected with a clear error."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adalora import AdaLoraConfig, AdapterFormatError, inject_adapters, load_adapter, save_adapter
from adalora.adapter_file import METADATA_KEY, read_manifest, tensors_sha256
from tests.conftest import tiny_bert, tiny_llama


def make_adapter(task="causal-lm"):
    model = tiny_bert() if task == "seq-cls" else tiny_llama()
    adapters = inject_adapters(model, AdaLoraConfig(init_r=4, target_r=2, total_step=10), task_type=task,
                               labels=["x", "y", "z"] if task == "seq-cls" else None)
    gen = torch.Generator().manual_seed(0)
    masks = {p: torch.rand(4, generator=gen) > 0.4 for p in adapters.layers}
    masks[next(iter(masks))][:] = False
    with torch.no_grad():
        for layer in adapters.layers.values():
            layer.lam.normal_()
    return adapters.export(masks, info={"note": "test"})


@pytest.mark.parametrize("task", ["causal-lm", "seq-cls"])
def test_round_trip_is_exact(tmp_path, task):
    adapter = make_adapter(task)
    path = save_adapter(adapter, tmp_path / "a")
    loaded = load_adapter(tmp_path / "a")
    assert loaded.ranks() == adapter.ranks() and loaded.shapes == adapter.shapes
    assert loaded.base == adapter.base and loaded.labels == adapter.labels and loaded.info == adapter.info
    assert (loaded.init_r, loaded.lora_alpha, loaded.task_type) == (adapter.init_r, adapter.lora_alpha, adapter.task_type)
    for p, layer in adapter.layers.items():
        for name in ("P", "lam", "Q"):
            assert torch.equal(getattr(loaded.layers[p], name), getattr(layer, name))
    assert loaded.head.keys() == adapter.head.keys()
    assert all(torch.equal(loaded.head[k], v) for k, v in adapter.head.items())
    with safe_open(str(path), framework="pt") as f:
        assert not any(k.startswith(f"layers.{next(iter(adapter.shapes))}.") for k in f.keys())  # rank 0: no tensors
    assert read_manifest(path)["num_params"] == adapter.num_params()


def _rewrite(path, mutate_tensors=None, mutate_meta=None):
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()[METADATA_KEY])
    if mutate_tensors:
        mutate_tensors(tensors)
    if mutate_meta:
        mutate_meta(meta, tensors)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(meta)})


def _first_key(tensors, suffix):
    return next(k for k in sorted(tensors) if k.endswith(suffix))


def _resign(meta, tensors):
    meta["tensors_sha256"] = tensors_sha256(tensors)


CORRUPTIONS = [
    ("flipped value", lambda t: t[_first_key(t, ".P")].mul_(2), None, "does not match its sha256"),
    ("nan", lambda t: t[_first_key(t, ".Q")].fill_(float("nan")), _resign, "NaN or inf"),
    ("wrong shape", lambda t: t.__setitem__(_first_key(t, ".Q"), torch.zeros(1, 3)), _resign, "has shape"),
    ("missing tensor", lambda t: t.pop(_first_key(t, ".lam")), _resign, "are missing"),
    ("extra tensor", lambda t: t.__setitem__("layers.nowhere.P", torch.zeros(1, 1)), _resign, "belong to no module"),
    ("int dtype", lambda t: t.__setitem__(_first_key(t, ".lam"), t[_first_key(t, ".lam")].long()), _resign, "float type"),
    ("future version", None, lambda m, t: m.update(format_version=99), "v99"),
    ("missing field", None, lambda m, t: m.pop("init_r"), "lacks field 'init_r'"),
]


@pytest.mark.parametrize("name,tensors,meta,message", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_corrupt_files_are_rejected(tmp_path, name, tensors, meta, message):
    path = save_adapter(make_adapter(), tmp_path / "a")
    _rewrite(path, tensors, meta)
    with pytest.raises(AdapterFormatError, match=message):
        load_adapter(path)


def test_non_adapter_files_are_rejected(tmp_path):
    with pytest.raises(AdapterFormatError, match="no such adapter file"):
        load_adapter(tmp_path / "missing")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(AdapterFormatError, match="not a readable safetensors"):
        load_adapter(tmp_path / "junk.safetensors")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(AdapterFormatError, match="no 'adalora' manifest"):
        load_adapter(tmp_path / "plain.safetensors")


def test_failed_save_leaves_old_file_untouched_and_no_temp(tmp_path):
    good = make_adapter()
    path = save_adapter(good, tmp_path / "a")
    before = path.read_bytes()
    bad = make_adapter()
    next(iter(bad.layers.values())).P.fill_(float("inf"))
    with pytest.raises(AdapterFormatError, match="NaN or inf"):
        save_adapter(bad, tmp_path / "a")
    assert path.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["adapter.safetensors"]


def test_seq_cls_adapter_needs_labels(tmp_path):
    adapter = make_adapter("seq-cls")
    adapter.labels = None
    with pytest.raises(AdapterFormatError, match="label names"):
        save_adapter(adapter, tmp_path / "a")
    assert not (tmp_path / "a" / "adapter.safetensors").exists()


def test_crash_during_write_leaves_no_partial_file(tmp_path, monkeypatch):
    import adalora.adapter_file as af

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(af, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(make_adapter(), tmp_path / "a")
    assert list((tmp_path / "a").iterdir()) == []
