"""Property-based tests (hypothesis): random configs, overrides, YAML text and random bytes thrown at the config
loader and the file readers either succeed or raise kdkit's own error type, never anything else."""

from __future__ import annotations

import gzip
import pickle
import string
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdkit.config import TOP_KEYS, Config, apply_overrides, build_config, load_config
from kdkit.config import DataConfig as _DataConfig
from kdkit.config import TrainConfig as _TrainConfig
from kdkit.data import load_data
from kdkit.data.cifar import read_pickle
from kdkit.data.files import read_bytes
from kdkit.data.idx import parse_idx
from kdkit.engine.checkpoint import read
from kdkit.errors import KdkitError
from kdkit.modelfile import load

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

#: real keys, so that many examples get past the first check and reach the typed validation
KEYS = sorted({*TOP_KEYS, *_TrainConfig.__dataclass_fields__, *_DataConfig.__dataclass_fields__, "arch", "width",
               "hidden", "checkpoint", "name", "temperature", "pairs", "augment", "crop_padding", "hflip"}
              - {"module"})  # `module` imports a Python module by name: not something to feed random text
names = st.one_of(st.sampled_from(KEYS), st.text(string.ascii_letters + "_.", min_size=1, max_size=8))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["sgd", "adam", "kd", "mnist", "digits", "lenet5", "cosine"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(names, inner, max_size=4)), max_leaves=12)
sections = st.dictionaries(st.sampled_from(TOP_KEYS) | names, values, max_size=6)


def _ok_or_ours(fn, *args, **kw):
    try:
        return fn(*args, **kw)
    except KdkitError:
        return None


@SETTINGS
@given(sections)
def test_random_configs_build_or_raise_a_config_error(raw):
    cfg = _ok_or_ours(build_config, raw)
    assert cfg is None or isinstance(cfg, Config)


@SETTINGS
@given(st.lists(st.tuples(names, st.sampled_from(["", "."]), names, st.text(max_size=10)), max_size=5))
def test_random_overrides_apply_or_raise_a_config_error(items):
    overrides = [f"{a}{dot}{b}={v}" for a, dot, b, v in items]
    cfg = _ok_or_ours(lambda: build_config(apply_overrides({}, overrides)))
    assert cfg is None or isinstance(cfg, Config)


@SETTINGS
@given(st.one_of(st.text(max_size=200), values.map(lambda v: yaml.safe_dump(v))))
def test_random_yaml_files_load_or_raise_a_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("yaml") / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    _ok_or_ours(load_config, path)


@SETTINGS
@given(st.binary(max_size=400))
def test_random_bytes_as_a_yaml_file(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("yaml") / "recipe.yaml"
    path.write_bytes(data)
    _ok_or_ours(load_config, path)


def _idx_header(ndim: int) -> st.SearchStrategy[bytes]:
    dims = st.lists(st.integers(0, 40), min_size=ndim, max_size=ndim)
    return dims.map(lambda d: bytes([0, 0, 8, ndim]) + b"".join(int(x).to_bytes(4, "big") for x in d))


@SETTINGS
@given(st.one_of(st.binary(max_size=300), st.tuples(_idx_header(3), st.binary(max_size=2000)).map(b"".join)),
       st.sampled_from([1, 3]))
def test_random_bytes_as_an_idx_file(data, ndim):
    out = _ok_or_ours(parse_idx, data, "random-idx", ndim)
    assert out is None or (isinstance(out, np.ndarray) and out.ndim == ndim and out.dtype == np.uint8)


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_as_a_gz_file(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("gz") / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(data if data[:1] != b"+" else gzip.compress(data))
    _ok_or_ours(read_bytes, path)


pickled = st.recursive(st.one_of(st.none(), st.integers(), st.binary(max_size=20), st.text(max_size=5)),
                       lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.binary(max_size=6),
                                                                                            inner, max_size=3)),
                       max_leaves=8).map(pickle.dumps)


@SETTINGS
@given(st.one_of(st.binary(max_size=300), pickled))
def test_random_bytes_as_a_cifar_pickle(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("pickle") / "data_batch_1"
    path.write_bytes(data)
    out = _ok_or_ours(read_pickle, path)
    assert out is None or isinstance(out, dict)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from([b"data", b"labels", b"fine_labels", b"filenames"]),
                       st.one_of(st.binary(max_size=50), st.lists(st.integers(-3, 300), max_size=8),
                                 st.integers(0, 255).map(lambda v: np.full((2, 3072), v, np.uint8))), max_size=4))
def test_random_cifar_batches_load_or_raise_a_data_error(tmp_path_factory, batch):
    from .test_data import write_cifar

    root = tmp_path_factory.mktemp("cifar")
    write_cifar(root, "cifar10")
    (root / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(batch))
    _ok_or_ours(load_data, _DataConfig(name="cifar10", root=str(root), val_split=0))


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_as_an_image_in_a_folder(tmp_path_factory, data):
    from .test_data import write_images

    root = tmp_path_factory.mktemp("imgs")
    write_images(root, classes=2, per=2, size=(8, 8))
    (root / "class1" / "random.png").write_bytes(data)
    _ok_or_ours(load_data, _DataConfig(name="imagefolder", root=str(root), val_split=0, test_split=0.5))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on protocol-4 pickles
@SETTINGS
@given(st.one_of(st.binary(max_size=300), pickled))
def test_random_bytes_as_a_checkpoint_or_model_file(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    path.write_bytes(data)
    _ok_or_ours(read, path)
    _ok_or_ours(load, path)


@pytest.mark.parametrize("reader", ["idx", "pickle"])
def test_a_valid_file_still_reads(tmp_path: Path, reader: str):
    """The properties above are not vacuous: the same readers accept well-formed input."""
    if reader == "idx":
        a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
        data = bytes([0, 0, 8, 3]) + b"".join(x.to_bytes(4, "big") for x in a.shape) + a.tobytes()
        assert np.array_equal(parse_idx(data, "ok", 3), a)
    else:
        (tmp_path / "b").write_bytes(pickle.dumps({b"data": b"x"}))
        assert read_pickle(tmp_path / "b") == {"data": b"x"}
