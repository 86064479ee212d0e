"""No silent downgrade (dcq_ops.downgrades): a missing torch feature that makes the
package take a slower or assumed path is said once (RuntimeWarning) and recorded.
The features are simulated missing: no GPU needed."""

import types
import warnings

import pytest
import torch

from dcq_ops import downgrades
from dcq_ops.ops import chunked
from dcq_ops.triton.configs import ARCHITECTURES, tile_config, tile_configs


@pytest.fixture(autouse=True)
def _fresh_record():
    downgrades.clear()
    yield
    downgrades.clear()


def _props_without_optin(major, minor):
    # What torch.cuda.get_device_properties returns, less shared_memory_per_block_optin.
    return types.SimpleNamespace(major=major, minor=minor, multi_processor_count=132, name="simulated GPU")


@pytest.fixture
def launch(monkeypatch):
    pytest.importorskip("triton")
    from dcq_ops.triton import launch as module
    module.device_architecture.cache_clear()
    yield module
    module.device_architecture.cache_clear()


def test_missing_optin_on_sm90_is_said_once_recorded_and_keeps_64x64_tiles(launch, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: _props_without_optin(9, 0))
    with pytest.warns(RuntimeWarning, match="shared_memory_per_block_optin"):
        architecture, sms = launch.device_architecture(0)
    # The value CUDA specifies for sm_90, not sm_86's 99 KiB (which chose 32 x 32 tiles).
    assert architecture.shared_memory_per_block_optin == ARCHITECTURES["sm_90"].shared_memory_per_block_optin
    assert (tile_config(architecture, 2, 512).block_m, tile_config(architecture, 2, 512).block_k) == (64, 64)
    assert sms == 132
    records = downgrades.downgrades()
    assert [r["feature"] for r in records] == [downgrades.OPTIN_FEATURE]
    assert records[0]["device"] == "cuda:0"
    assert set(records[0]) == {"feature", "what", "consequence", "fix", "device", "backend"}
    assert records[0]["backend"] == "triton"
    # Said once: a second device lookup (cache cleared) records nothing new and stays silent.
    launch.device_architecture.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        launch.device_architecture(0)
    assert len(downgrades.downgrades()) == 1


def test_missing_optin_on_an_unknown_gpu_says_the_smaller_tiles(launch, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: _props_without_optin(12, 1))
    with pytest.warns(RuntimeWarning, match="smaller tiles"):
        architecture, _ = launch.device_architecture(0)
    assert architecture.shared_memory_per_block_optin == downgrades.CONSERVATIVE_OPTIN
    assert downgrades.downgrades("cuda:0")[0]["consequence"].startswith("smaller tiles")


def test_reported_optin_is_used_without_a_word(launch, monkeypatch):
    props = _props_without_optin(9, 0)
    props.shared_memory_per_block_optin = 200 << 10
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        architecture, _ = launch.device_architecture(0)
    assert architecture.shared_memory_per_block_optin == 200 << 10
    assert downgrades.downgrades() == []


def test_missing_mm_dtype_out_is_said_once_and_recorded(monkeypatch):
    monkeypatch.setattr(downgrades, "mm_dtype_out_available", lambda: False)
    monkeypatch.setattr(downgrades, "_MM_DTYPE_OUT", [])
    with pytest.warns(RuntimeWarning, match="aten::mm.dtype_out"):
        downgrades.note_chunked_gemm(torch.device("cuda", 0), torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        downgrades.note_chunked_gemm(torch.device("cuda", 1), torch.float16)
    (record,) = downgrades.downgrades()
    assert record["feature"] == "aten::mm.dtype_out" and record["device"] == "cuda"
    assert "fp32" in record["what"]
    # It concerns CUDA only: not listed for the CPU, listed for any CUDA device.
    assert downgrades.downgrades("cpu") == []
    assert [r["feature"] for r in downgrades.downgrades("cuda:1")] == ["aten::mm.dtype_out"]


def test_a_tile_that_spills_for_wide_embeddings_is_said(recwarn):
    # D = 4096 with 16-bit operands: even the smallest tile holds 512 accumulator registers a thread.
    with pytest.warns(RuntimeWarning, match="D=4096"):
        (config,) = tile_configs(ARCHITECTURES["sm_90"], 2, 4096)
    (record,) = downgrades.downgrades()
    assert "register spills" in record["consequence"] and str(config.as_dict()) in record["what"]
    # D = 512 fits every architecture: nothing is said.
    recwarn.clear()
    for architecture in ARCHITECTURES.values():
        tile_configs(architecture, 2, 512)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    assert len(downgrades.downgrades()) == 1


def test_summary_is_one_line_for_backends(monkeypatch):
    assert downgrades.summary("cpu") is None
    monkeypatch.setattr(downgrades, "mm_dtype_out_available", lambda: False)
    monkeypatch.setattr(downgrades, "_MM_DTYPE_OUT", [])
    with pytest.warns(RuntimeWarning):
        downgrades.note_chunked_gemm(torch.device("cuda"), torch.bfloat16)
    line = downgrades.summary()
    assert line.startswith("aten::mm.dtype_out missing on cuda: ") and "\n" not in line
    assert downgrades.summary("cuda", backend="chunked") == line
    assert downgrades.summary("cuda", backend="triton") is None


@pytest.mark.parametrize("device,dtype", [("cpu", torch.bfloat16), ("cuda", torch.float32),
                                          ("cuda", torch.float64)])
def test_no_mm_dtype_out_downgrade_where_it_is_not_used(monkeypatch, device, dtype):
    # CPU GEMMs and same-dtype CUDA GEMMs never look the overload up (queue_pass.cu's mm_into).
    monkeypatch.setattr(downgrades, "mm_dtype_out_available", lambda: False)
    monkeypatch.setattr(downgrades, "_MM_DTYPE_OUT", [])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        downgrades.note_chunked_gemm(torch.device(device), dtype)
    assert downgrades.downgrades() == []


def test_chunked_ops_report_their_gemm_dtype(monkeypatch):
    # The chunked entry points say what their GEMMs multiply in, on every call.
    seen = []
    monkeypatch.setattr(chunked, "note_chunked_gemm", lambda device, dtype: seen.append((device.type, dtype)))
    monkeypatch.setattr(torch.ops.dcq_ops, "dcq_cross_entropy", lambda *args: None, raising=False)
    monkeypatch.setattr(torch.ops.dcq_ops, "dcq_cross_entropy_partials", lambda *args: None, raising=False)
    x = torch.zeros(2, 4)
    w16 = torch.zeros(3, 4, dtype=torch.bfloat16)
    labels = torch.zeros(2, dtype=torch.long)
    chunked.dcq_cross_entropy(x, x, labels, w16, labels, 1.0, 1.0, 0.0, 0.0, 0.0, False, False)
    chunked.dcq_cross_entropy_partials(x.double(), labels, w16, labels, 1.0, 0.0, False)
    assert seen == [("cpu", torch.bfloat16), ("cpu", torch.float64)]


def test_this_torch_has_every_feature():
    # torch 2.11 (the GPU machines') and 2.14 have both: docs/numerics.md, "torch 2.11".
    assert downgrades.mm_dtype_out_available()
    if torch.version.cuda is None:
        pytest.skip("a torch built without CUDA has no CUDA device properties")
    assert "shared_memory_per_block_optin" in dir(torch._C._CudaDeviceProperties)


def test_backends_and_the_check_report_a_downgrade(monkeypatch, tmp_path):
    import importlib

    from dcq_ops.check import command
    backends_module = importlib.import_module("dcq_ops.backends")  # dcq_ops.backends is also a function
    assert "downgraded" not in backends_module.backends("cuda")["chunked"]
    monkeypatch.setattr(downgrades, "mm_dtype_out_available", lambda: False)
    monkeypatch.setattr(downgrades, "_MM_DTYPE_OUT", [])
    with pytest.warns(RuntimeWarning):
        downgrades.note_chunked_gemm(torch.device("cuda"), torch.bfloat16)
    report = backends_module.backends("cuda")
    assert "downgraded: aten::mm.dtype_out missing on cuda" in report["chunked"]
    assert "downgraded" not in report["triton"]
    # The check JSON lists the downgrades of its device (the CPU has none; a CUDA record concerns CUDA only).
    skips = [arg for part in ("numerics", "triton_configuration", "first_contact", "sync_free_step", "timing")
             for arg in ("--skip", part)]
    args = command.parser().parse_args(["--device", "cpu", *skips, "--out", str(tmp_path / "c.json")])
    args.timing_shape = (64, 256, 32)
    assert command.run(args)["downgrades"] == []
    simulated = {"feature": "simulated", "what": "w", "consequence": "c", "fix": "f", "device": "cpu",
                 "backend": "chunked"}
    monkeypatch.setattr(downgrades, "downgrades", lambda device=None: [simulated])
    data = command.run(args)
    assert data["downgrades"] == [simulated] and "downgraded: simulated" in data["backends"]["chunked"]
