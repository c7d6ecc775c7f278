"""save_adapter_streamed writes the same adapter file as save_adapter, layer by layer; StreamWriter writes plain
safetensors whatever order tensors arrive in; every bad stream leaves no file (and an old one untouched)."""

import io

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load

from adalora import AdapterFormatError, load_adapter, save_adapter
from adalora.adapter import AdapterLayer
from adalora.adapter_file import read_manifest, save_adapter_streamed, tensors_sha256
from adalora.safetensors_stream import StreamWriter
from tests.test_adapter_file import make_adapter


def shell_of(adapter):
    """(the adapter without layers, its ranks, its layers in module order)."""
    layers = list(adapter.layers.items())
    shell = type(adapter)(**{**vars(adapter), "layers": {}})
    return shell, {p: layer.rank for p, layer in layers}, layers


@pytest.mark.parametrize("task", ["causal-lm", "seq-cls"])
def test_streamed_file_equals_save_adapter(tmp_path, task):
    adapter = make_adapter(task)
    shell, ranks, layers = shell_of(adapter)
    streamed = save_adapter_streamed(shell, ranks, iter(layers), tmp_path / "streamed")
    saved = save_adapter(adapter, tmp_path / "saved")
    assert read_manifest(streamed) == read_manifest(saved)  # sha256 included: the same tensors, digested alike
    with safe_open(str(streamed), framework="pt") as a, safe_open(str(saved), framework="pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    loaded = load_adapter(streamed)  # verifies the patched sha256 against the data
    assert loaded.ranks() == adapter.ranks() and loaded.head.keys() == adapter.head.keys()


def wrong_rank(layers):
    path, layer = layers[1]
    return layers[:1] + [(path, AdapterLayer(layer.P[:, :-1], layer.lam[:-1], layer.Q[:-1]))] + layers[2:]


def nan_layer(layers):
    path, layer = layers[1]
    P = layer.P.clone()
    P[0, 0] = float("nan")
    return layers[:1] + [(path, AdapterLayer(P, layer.lam, layer.Q))] + layers[2:]


def failing_producer(layers):
    yield layers[0]
    raise RuntimeError("the merge failed half way")


BAD_STREAMS = [  # (case, layers -> what the producer yields, error, fragment)
    ("a layer is missing", lambda layers: layers[:-1], AdapterFormatError, "never arrived"),
    ("a layer at another rank", wrong_rank, AdapterFormatError, "the header says"),
    ("a layer given twice", lambda layers: layers + layers[-1:], AdapterFormatError, "given twice"),
    ("a module the adapter lacks", lambda layers: layers + [("no.such.module", layers[0][1])], AdapterFormatError,
     "not among the adapted modules"),
    ("NaN values", nan_layer, AdapterFormatError, "NaN or inf"),
    ("the producer fails", failing_producer, RuntimeError, "half way"),
]


@pytest.mark.parametrize("case, produce, error, fragment", BAD_STREAMS, ids=[c[0] for c in BAD_STREAMS])
def test_bad_stream_leaves_the_old_file_and_no_temp(tmp_path, case, produce, error, fragment):
    adapter = make_adapter()
    old = save_adapter(adapter, tmp_path / "out")
    before = old.read_bytes()
    shell, ranks, layers = shell_of(adapter)
    with pytest.raises(error, match=fragment):
        save_adapter_streamed(shell, ranks, iter(produce(layers)), tmp_path / "out")
    assert old.read_bytes() == before
    assert [f.name for f in (tmp_path / "out").iterdir()] == [old.name]


def test_ranks_for_a_module_the_adapter_lacks_are_refused(tmp_path):
    shell, ranks, layers = shell_of(make_adapter())
    with pytest.raises(AdapterFormatError, match="does not adapt"):
        save_adapter_streamed(shell, {**ranks, "no.such.module": 2}, iter(layers), tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def tensors(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {"b.x": torch.randn(3, 2, generator=gen), "a": torch.randn(5, generator=gen).half(),
            "c": torch.randn(2, 2, generator=gen).bfloat16(), "empty": torch.zeros(0, 4)}


def test_stream_writer_accepts_any_order_and_writes_plain_safetensors():
    data = tensors()
    buffer, seen = io.BytesIO(), []
    writer = StreamWriter(buffer, {k: (t.dtype, tuple(t.shape)) for k, t in data.items()}, {"note": "PENDING!"},
                          on_write=lambda name, t: seen.append(name))
    for name in ["c", "empty", "b.x", "a"]:  # "a" sorts first: everything waits for it
        writer.put(name, data[name])
    writer.finish({"PENDING!": "patched!"})
    assert seen == sorted(data)  # written (and digested) in sorted name order
    loaded = load(buffer.getvalue())
    assert loaded.keys() == data.keys() and all(torch.equal(loaded[k], data[k]) for k in data)
    assert b'"note":"patched!"' in buffer.getvalue()[: 8 + int.from_bytes(buffer.getvalue()[:8], "little")]


WRITER_ERRORS = [  # (case, action on a writer over tensors(), fragment)
    ("unknown name", lambda w, d: w.put("zzz", d["a"]), "not in the file's header"),
    ("wrong dtype", lambda w, d: w.put("a", d["a"].float()), "the header says"),
    ("wrong shape", lambda w, d: w.put("b.x", d["b.x"].T), "the header says"),
    ("given twice", lambda w, d: (w.put("a", d["a"]), w.put("a", d["a"])), "given twice"),
    ("finished early", lambda w, d: (w.put("a", d["a"]), w.finish()), "never arrived, first 'b.x'"),
    ("placeholder of another length", lambda w, d: ([w.put(k, t) for k, t in d.items()], w.finish({"PENDING!": "x"})),
     "as long as its value"),
]


@pytest.mark.parametrize("case, action, fragment", WRITER_ERRORS, ids=[c[0] for c in WRITER_ERRORS])
def test_stream_writer_errors(case, action, fragment):
    data = tensors()
    writer = StreamWriter(io.BytesIO(), {k: (t.dtype, tuple(t.shape)) for k, t in data.items()}, {"note": "PENDING!"})
    with pytest.raises(ValueError, match=fragment):
        action(writer, data)


def test_digest_and_writer_take_a_size_one_last_dim_with_any_stride():
    """A rank-1 factor sliced out of a wider one (P[:, :1] of a transposed matrix) is contiguous with stride 32
    in its size-1 last dim; digesting or writing it used to fail on view(uint8) (ties merges hit it)."""
    column = torch.as_strided(torch.randn(64), (5, 1), (1, 32))  # contiguous, stride(-1) = 32
    assert column.is_contiguous() and column.stride(-1) == 32
    assert tensors_sha256({"t": column}) == tensors_sha256({"t": column.clone(memory_format=torch.contiguous_format)})
    buffer = io.BytesIO()
    writer = StreamWriter(buffer, {"t": (column.dtype, (5, 1))}, {})
    writer.put("t", column)
    writer.finish()
    assert torch.equal(load(buffer.getvalue())["t"], column)
