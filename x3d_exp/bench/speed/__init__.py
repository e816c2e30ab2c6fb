"""CPU speed of our MindSpore X3D against PyTorchVideo's X3D, or against the inference runtimes, in one run.

    python -m x3d_exp.bench.speed                     # XS, S, M; forward b1, forward b8, train step b8
    python -m x3d_exp.bench.speed --variants xs --repeats 5 --json out.json
    python -m x3d_exp.bench.speed --against onnxruntime,openvino_f32,openvino --cases fwd1,fwd8 --no-profile

`--against` names the runtimes timed beside ours. ONNX Runtime and OpenVINO (f32, and at its default precision,
bfloat16 where the CPU has it) run our own ONNX export of the very weights ours runs, on the same input, with the
machine's cores as threads; the report gives the largest logit difference of each from ours.

Ours infers with the BatchNorms folded into the channelwise-conv kernels
(`x3d_exp.models.fuse`; `--no-fuse` for the plain eval-mode network).
Each framework runs in its own worker process (their thread pools would
fight inside one), and the driver asks them for one timed step at a time
(each after an untimed one of its own), alternating, so load from other
jobs on the machine hits both alike. Times
are medians of wall-clock per step after warm-up (graph compilation for
MindSpore). Peak memory is each worker's peak RSS during the timed steps
(Linux VmHWM, reset after warm-up), and in brackets its rise over the RSS
at the reset: both workers keep memory pools from earlier cases. Afterwards the MindSpore profiler
splits our step time by layer type, and the channelwise-conv kernels are
compared with the machine's copy bandwidth.

The PyTorch side needs `pip install -e .[bench]` (torch CPU, pytorchvideo), the runtimes
`pip install -e ".[bench,onnx]"`; `--against none` times ours alone.

Modules: cases (what is timed), workers (a process per runtime), runner, mindspore_runner, torch_runner and
onnx_runners (each runtime's steps), torchvision_stub, memory (peak RSS), profile (MindSpore's profiler by layer
type), machine (description and copy bandwidth), tables (the printed report), driver (run and the command line).
"""
