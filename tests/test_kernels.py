import pytest

from medlab import kernels

# oneDNN 3.x's verbose lines (v1), as TensorFlow 2.21 prints them, plus lines that are not a kernel's run.
LOG = """\
onednn_verbose,v1,info,oneDNN v3.7.0 (commit n/a)
onednn_verbose,v1,primitive,create:cache_miss,cpu,convolution,brg_conv_fwd:avx10_1_512_amx,forward_training,src:bf16,,alg:convolution_direct,mb64_ic32oc64_ih32oh32kh3sh1dh0ph1_iw32ow32kw3sw1dw0pw1,0.5
onednn_verbose,v1,primitive,exec,cpu,convolution,brg_conv_fwd:avx10_1_512_amx,forward_training,src:bf16::blocked:acdb::f0 wei:bf16:a:blocked:AcdB32a2b::f0 bia:undef::undef::: dst:bf16::blocked:acdb::f0,attr-scratchpad:user,alg:convolution_direct,mb64_ic32oc64_ih32oh32kh3sh1dh0ph1_iw32ow32kw3sw1dw0pw1,1.25
onednn_verbose,v1,primitive,exec,cpu,convolution,brgconv_bwd_w:avx10_1_512_amx,backward_weights,src:bf16::blocked:acdb::f0,,alg:convolution_direct,mb64_ic32oc64_ih32oh32kh3sh1dh0ph1_iw32ow32kw3sw1dw0pw1,5.0
onednn_verbose,v1,primitive,exec,cpu,convolution,jit:avx512_core,backward_weights,src:f32::blocked:acdb::f0,,alg:convolution_direct,g960mb64_ic960oc960_ih2oh2kh3sh1dh0ph1_iw2ow2kw3sw1dw0pw1,3.0
onednn_verbose,v1,primitive,exec,cpu,batch_normalization,bnorm_tbb_jit:avx512_core_bf16,forward_training,data:bf16::blocked:acdb::f0,,flags:CH,mb64ic64ih32iw32,1.5
onednn_verbose,v1,primitive,exec,cpu,reorder,jit:uni,undef,src:bf16::blocked:cdba::f0 dst:bf16::blocked:Acdb16a::f0,,,32x1x3x3,0.25
onednn_verbose,v1,primitive,exec,cpu,matmul,brg_matmul:avx10_1_512_amx,undef,src:bf16::blocked:ab::f0,attr-scratchpad:user,,64x256:256x128,0.5
onednn_verbose,v1,primitive,exec,cpu,softmax,ref:any,forward_training,data:f32,,alg:softmax_accurate,64x2,0.125
onednn_verbose,v1,graph,exec,cpu,partition_1,dnnl_backend,0.5
onednn_verbose,v1,primitive,exec,cpu,pooling,jit:avx512_core_bf16,forward_training,src:bf16,,alg:pooling_max,mb64ic64_ih32oh16kh2sh2dh0ph0_iw32ow16kw2sw2dw0pw0,not-a-time
"""


def test_convolution_and_matrix_product_flops_come_from_the_shapes_onednn_logs():
    assert kernels.problem_gflop("convolution", "mb64_ic32oc64_ih32oh32kh3sh1dh0ph1_iw32ow32kw3sw1dw0pw1") == \
        pytest.approx(2 * 64 * 64 * 32 * 32 * 32 * 9 / 1e9)
    strided = "mb64_ic1oc32_ih64oh32kh3sh2dh0ph0_iw64ow32kw3sw2dw0pw0"  # the output's size counts, not the input's
    assert kernels.problem_gflop("convolution", strided) == pytest.approx(2 * 64 * 32 * 32 * 32 * 1 * 9 / 1e9)
    depthwise = "g960mb64_ic960oc960_ih2oh2kh3sh1dh0ph1_iw2ow2kw3sw1dw0pw1"  # one input channel per group
    assert kernels.problem_gflop("convolution", depthwise) == pytest.approx(2 * 64 * 960 * 2 * 2 * 1 * 9 / 1e9)
    assert kernels.problem_gflop("matmul", "64x256:256x128") == pytest.approx(2 * 64 * 256 * 128 / 1e9)
    assert kernels.problem_gflop("matmul", "4x64x256:4x256x128") == pytest.approx(2 * 4 * 64 * 256 * 128 / 1e9)
    assert kernels.problem_gflop("batch_normalization", "mb64ic64ih32iw32") is None
    assert kernels.problem_gflop("convolution", "mb64_ic32oc64_id8od8kd3_ih8oh8kh3_iw8ow8kw3") is None  # 3-D: not counted


def test_only_the_runs_of_kernels_are_read():
    records = kernels.parse_verbose(LOG.splitlines())
    assert [(r["kind"], r["pass"]) for r in records] == [
        ("convolution", "forward_training"), ("convolution", "backward_weights"), ("convolution", "backward_weights"),
        ("batch_normalization", "forward_training"), ("reorder", "undef"), ("matmul", "undef"),
        ("softmax", "forward_training")]
    assert records[0]["ms"] == 1.25 and records[0]["implementation"] == "brg_conv_fwd:avx10_1_512_amx"
    older = "onednn_verbose,exec,cpu,convolution,jit:avx2,forward_training,src_f32::blocked:acdb:f0,,alg:convolution_direct,mb2_ic1oc8_ih8oh8kh3sh1dh0ph1_iw8ow8kw3sw1dw0pw1,0.75"
    assert kernels.parse_verbose([older])[0]["gflop"] == pytest.approx(2 * 2 * 8 * 8 * 8 * 9 / 1e9)


def test_summary_is_per_step_with_the_convolutions_together():
    summary = kernels.summarise(kernels.parse_verbose(LOG.splitlines()), steps=2)
    rows = summary["kernels"]
    assert set(rows) == {"convolution forward", "convolution backward weights", "batch norm forward", "reorder",
                         "matmul", "softmax forward"}
    forward = rows["convolution forward"]
    assert forward["ms"] == 0.625 and forward["calls"] == 0.5
    assert forward["gflops"] == pytest.approx(2 * 64 * 64 * 32 * 32 * 32 * 9 / 1.25 / 1e6, rel=1e-3)
    assert rows["convolution backward weights"]["calls"] == 1.0 and rows["batch norm forward"]["gflops"] is None
    convolution_gflop = (2 * 2 * 64 * 64 * 32 * 32 * 32 * 9 + 2 * 64 * 960 * 4 * 9) / 1e9
    assert summary["convolutions"]["ms"] == pytest.approx((1.25 + 5.0 + 3.0) / 2)
    assert summary["convolutions"]["gflops"] == pytest.approx(convolution_gflop / 2 / (9.25 / 2) * 1e3, rel=1e-3)
    assert summary["onednn_ms"] == pytest.approx((1.25 + 5.0 + 3.0 + 1.5 + 0.25 + 0.5 + 0.125) / 2)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        kernels.summarise([], steps=0)


def test_table_has_a_column_per_step_and_the_usual_kernels_first():
    summary = kernels.summarise(kernels.parse_verbose(LOG.splitlines()), steps=1)
    other = {**summary, "kernels": {"convolution forward": summary["kernels"]["convolution forward"]}}
    table = kernels.markdown([{"model": "scratch_cnn_64px", "precision": "mixed_bfloat16", "batch_size": 64,
                               "step_wall_ms": 12.5, **summary},
                              {"model": "scratch_cnn_64px", "precision": "float32", "batch_size": 64,
                               "step_wall_ms": 30.0, **other}]).splitlines()
    assert table[0] == "| oneDNN kernel, ms per step of 64 images | scratch_cnn_64px bfloat16 | scratch_cnn_64px float32 |"
    names = [line.split(" | ")[0].removeprefix("| ") for line in table[2:10]]
    assert names == ["convolution forward", "convolution backward weights", "batch norm forward", "reorder", "matmul",
                     "softmax forward", "convolutions together", "all oneDNN kernels"]
    assert table[2].startswith("| convolution forward | 1.2 (1,933 GFLOP/s) | 1.2 (1,933 GFLOP/s) |")
    assert table[4] == "| batch norm forward | 1.5 | - |"
    assert table[10] == "| the step's wall time (log on) | 12.5 | 30.0 |"
    assert kernels.markdown([]) == ""
    failed = {"model": "scratch_cnn_128px", "precision": "float32", "error": "the step did not finish"}
    with_failure = kernels.markdown([{"model": "scratch_cnn_64px", "precision": "float32", "batch_size": 64,
                                      "step_wall_ms": 30.0, **other}, failed]).splitlines()
    assert with_failure[0].endswith("| scratch_cnn_64px float32 |")  # no column for the failed one
    assert with_failure[-1] == "Not logged, scratch_cnn_128px float32: the step did not finish"
    assert kernels.markdown([failed]) == with_failure[-1]


def test_run_logged_cuts_the_log_at_the_markers_and_reports_a_failure():
    code = ("import os\nprint('onednn_verbose,before', flush=True)\n"
            f"print({kernels.START!r})\nprint(os.environ['ONEDNN_VERBOSE'])\nprint({kernels.END!r} + '{{\"step_wall_ms\": 2.5}}')\n"
            "print('after')")
    lines, measured = kernels.run_logged(code)
    assert lines == ["1"] and measured == {"step_wall_ms": 2.5}
    with pytest.raises(kernels.LogError, match=r"(?s)did not finish \(exit 1\).*ZeroDivisionError"):
        kernels.run_logged("print('MEDLAB-KERNELS-START')\n1 / 0")
    with pytest.raises(kernels.LogError, match="did not finish within 1 s"):
        kernels.run_logged("import time\ntime.sleep(30)", timeout=1)
