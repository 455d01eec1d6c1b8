"""Optional heavy packages (zfpy, numba, ptflops, vl-convert, timm): each is imported only where
it is used, and a missing or broken one fails only the feature that needs it, with one line that
names the package and the setting that avoids it (or what needs it). Each import is made to fail
here, the way a broken wheel fails (zfpy built against numpy 1 raises an ImportError)."""

import logging
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from conftest import ROOT, load_profile
from freezecache.core.errors import FreezecacheError


def one_line(err: pytest.ExceptionInfo, *parts: str) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    for part in parts:
        assert part in text, text
    return text


def relu_maps(n=4, c=3, hw=8) -> np.ndarray:
    g = np.random.default_rng(0)
    return np.maximum(g.normal(size=(n, c, hw, hw)), 0).astype(np.float32)


def test_optional_names_the_package_the_reason_and_the_setting(broken):
    from freezecache.core.errors import optional

    broken("zfpy")
    with pytest.raises(FreezecacheError) as err:
        optional("zfpy", "zfpy", "cache.codec: quant")
    assert one_line(err) == (
        "zfpy is not usable here (numpy.core.multiarray failed to import) — install it "
        "(pip install zfpy) or set cache.codec: quant"
    )


# -- zfpy: the zfp codec -----------------------------------------------------------------------
def test_broken_zfpy_fails_only_the_zfp_codec(broken):
    from freezecache.codecs.registry import make_codec

    broken("zfpy")
    x = relu_maps()
    with pytest.raises(FreezecacheError) as err:
        make_codec("zfp", 0.1).encode(x[:1])
    one_line(err, "zfpy", "cache.codec: quant", "numpy.core.multiarray")
    quant = make_codec("quant", 0.1)  # the default codec does not touch zfpy
    out = quant.decode(quant.encode(x[:1]), x[:1].shape)
    assert np.abs(out - x[:1]).max() <= 0.1


def test_missing_zfpy_is_one_line_too(broken):
    from freezecache.codecs.registry import make_codec

    broken("zfpy", error=ModuleNotFoundError("No module named 'zfpy'"))
    with pytest.raises(FreezecacheError) as err:
        make_codec("zfp", 0.1).decode(b"", (1, 3, 8, 8))
    one_line(err, "zfpy", "No module named 'zfpy'", "cache.codec: quant")


# -- numba: the rANS coder (an error) and the fused CPU pass (a fallback) ----------------------
def test_broken_numba_fails_only_rans_coding(broken):
    from freezecache.codecs.registry import make_codec

    broken("numba", "llvmlite", also=("freezecache.codecs.rans",))
    x = relu_maps()
    with pytest.raises(FreezecacheError) as err:
        make_codec("quant", 0.1, coding="rans").encode(x[:1])
    one_line(err, "numba", "pip install numba", "cache.coding: zstd")
    zstd = make_codec("quant", 0.1, coding="zstd")
    assert np.abs(zstd.decode(zstd.encode(x[:1]), x[:1].shape) - x[:1]).max() <= 0.1


def test_broken_numba_turns_the_fused_pass_off_with_one_line(broken, caplog):
    from freezecache.cache import fused

    broken("numba", "llvmlite")
    fused.available.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="freezecache.cache.fused"):
            assert fused.available() is False
    finally:
        fused.available.cache_clear()  # the next test sees the real numba again
    lines = [r.getMessage() for r in caplog.records if r.name == "freezecache.cache.fused"]
    assert len(lines) == 1 and "numba is not usable" in lines[0] and "\n" not in lines[0]
    assert "through torch" in lines[0]


# -- ptflops: FLOP accounting of every training stage and the plan -----------------------------
def test_broken_ptflops_is_one_line_that_says_what_needs_it(broken):
    from freezecache.accounting.flops import forward_macs_ptflops

    broken("ptflops")
    with pytest.raises(FreezecacheError) as err:
        forward_macs_ptflops(torch.nn.Conv2d(1, 2, 3), (1, 8, 8))
    one_line(err, "ptflops", "pip install ptflops", "training stages", "plan")


@pytest.mark.parametrize("step", ["train_prefix", "baseline", "train_suffix", "pretrain"])
def test_training_stages_stop_before_training_without_ptflops(broken, step, tmp_path):
    """The check comes first: no data, model or epoch is touched (the params point nowhere)."""
    from freezecache.config import parse_config
    from freezecache.steps import baselines, pretrain, suffix

    paths = {k: str(tmp_path / "nothing-here" / k) for k in ("data", "runs", "checkpoints")}
    cfg = parse_config(load_profile("default"))  # pretrain trains (a checkpoint would not)
    cfg = cfg.model_copy(update={"paths": cfg.paths.model_copy(update=paths)})
    broken("ptflops")
    call = {
        "train_prefix": lambda: baselines.train_prefix(cfg, 0),
        "baseline": lambda: baselines.baseline(cfg, 0, "normal"),
        "train_suffix": lambda: suffix.train_suffix(cfg, 0, "discard", 0),
        "pretrain": lambda: pretrain.pretrain(cfg),
    }[step]
    with pytest.raises(FreezecacheError) as err:
        call()
    one_line(err, "ptflops")


def test_flops_without_timm_count_a_plain_model(broken):
    from freezecache.accounting import flops
    from freezecache.models import create_model

    broken("timm")  # the hooks are looked up per count (timm's only when a model imported it)
    macs = flops.forward_macs_ptflops(create_model("resnet20", num_classes=10), (3, 32, 32))
    assert 35e6 < macs < 50e6  # ResNet-20 at 32x32: about 41 MMac


# -- vl-convert: offline plots ------------------------------------------------------------------
def test_broken_vl_convert_fails_only_the_offline_plots(broken):
    from freezecache.reporting import plots

    broken("vl_convert")
    with pytest.raises(FreezecacheError) as err:
        plots.template()
    one_line(err, "vl-convert-python", "freezecache plots", "dvc plots show")


def test_the_sweep_writes_its_tables_without_vl_convert(broken, tmp_path, caplog):
    from freezecache.tooling import sweep

    broken("vl_convert")
    rows = [
        {"codec": "quant", "coding": "zstd", "tolerance": 0.1, "relative": False,
         "bits_per_value": 3.6, "seed": s, "method": "discard", "accuracy": 94.7 + s}
        for s in range(2)
    ]  # fmt: skip
    with caplog.at_level(logging.WARNING):
        sweep.write(rows, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {
        "codec_sweep.csv",
        "codec_sweep.json",
        "codec_sweep.md",
    }
    warned = [r.getMessage() for r in caplog.records if "vl-convert" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0]


def test_the_bench_plot_is_skipped_without_vl_convert(broken):
    import benchlib

    broken("vl_convert")
    assert benchlib.svg({"mark": "bar"}) is None


# -- nothing optional at import time ------------------------------------------------------------
def test_every_module_imports_and_the_default_cache_works_without_the_optional_packages(tmp_path):
    """A fresh interpreter where zfpy, numba, ptflops, vl-convert and timm all fail to import:
    every freezecache module imports (but the rANS coder, which is numba code, imported only
    when ``cache.coding: rans`` asks for it), and the default codec writes and reads a cache."""
    script = textwrap.dedent(
        f"""
        import importlib, importlib.abc, pkgutil, sys
        class Refuse(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in {{"zfpy", "numba", "llvmlite", "ptflops", "vl_convert",
                                           "timm", "torchvision"}}:
                    raise ImportError("numpy.core.multiarray failed to import")
        sys.meta_path.insert(0, Refuse())
        import numpy as np
        import freezecache
        for m in pkgutil.walk_packages(freezecache.__path__, "freezecache."):
            # the rANS coder and the fused kernel themselves: numba's code, imported only by
            # what runs them when numba is there
            if m.name not in ("freezecache.codecs.rans", "freezecache.cache.fused_kernel"):
                importlib.import_module(m.name)
        from freezecache.cache import CacheWriter, Layout, open_cache, iter_cache
        from freezecache.codecs.registry import make_codec
        x = np.maximum(np.random.default_rng(0).normal(size=(6, 3, 8, 8)), 0).astype("float32")
        path = {str(tmp_path / "c.h5")!r}
        layout = Layout(num_samples=6, sample_shape=(3, 8, 8), chunk_size=1)
        with CacheWriter(path, make_codec("quant", 0.1), layout, prefix_hash="t") as w:
            w.add(x, np.zeros(6, np.int64))
        info = open_cache(path)
        got = np.concatenate([b["x"].numpy() for b in iter_cache(path, info)])
        assert np.abs(got - x).max() <= 0.1, "decode"
        assert not any(n.split(".")[0] in {{"zfpy", "numba", "ptflops", "vl_convert"}}
                       for n in sys.modules)
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
