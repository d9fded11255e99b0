"""The slow-bf16 check: a run asking for bf16 on a CPU without bf16 instructions is warned once, before it starts."""

from __future__ import annotations

import warnings

import pytest

from vargpt.training.precision import cpu_has_fast_bf16, warn_if_bf16_is_slow_here

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
WITH_BF16 = "flags\t\t: avx2 avx512f avx512_bf16\n"


def test_the_bf16_check_reads_the_cpu_flags():
    assert not cpu_has_fast_bf16(AVX2_ONLY)
    assert cpu_has_fast_bf16(WITH_BF16)
    assert cpu_has_fast_bf16("flags\t\t: avx2 amx_tile amx_bf16\n")
    assert cpu_has_fast_bf16("model name : unknown\n")  # no flags line: nothing is claimed


def test_only_bf16_on_a_cpu_without_the_instructions_is_warned_naming_the_remedy():
    with pytest.warns(UserWarning, match="no bf16 instructions.*drop --bf16"):
        assert warn_if_bf16_is_slow_here(True, True, "drop --bf16", cpuinfo=AVX2_ONLY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_bf16_is_slow_here(True, True, "x", cpuinfo=WITH_BF16)
        assert not warn_if_bf16_is_slow_here(False, True, "x", cpuinfo=AVX2_ONLY)  # fp32 run
        assert not warn_if_bf16_is_slow_here(True, False, "x", cpuinfo=AVX2_ONLY)  # on a GPU


def test_finetune_with_bf16_on_such_a_cpu_warns_before_loading(tmp_path, monkeypatch):
    from vargpt.training import finetune

    class Loaded(Exception):
        pass

    def stop(*args, **kwargs):
        raise Loaded

    monkeypatch.setattr(finetune, "load_for_training", stop)
    monkeypatch.setattr("vargpt.training.precision.cpu_has_fast_bf16", lambda cpuinfo=None: False)
    rows, out = str(tmp_path / "rows.jsonl"), str(tmp_path / "out")
    args = finetune.FinetuneArgs(model="tiny", data=[rows], out=out, bf16=True)
    with pytest.warns(UserWarning, match="drop --bf16"), pytest.raises(Loaded):
        finetune.run_finetune(args)
