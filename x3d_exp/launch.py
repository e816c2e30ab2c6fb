"""Process set-up that must happen before MindSpore runs its first CPU kernel.

`ONEDNN_MAX_CPU_ISA`: oneDNN's AVX-512 code paths run every Conv3d with a
kernel larger than 1 (X3D's stem 1x3x3 conv among them) as its reference
implementation, about 100x slower than its AVX2 GEMM path on this project's
AMD EPYC machines. oneDNN reads the variable when it creates its first
primitive, so setting it in `os.environ` here, even after `import mindspore`,
is enough: no re-exec is needed (checked with ONEDNN_VERBOSE, which reports
`isa:Intel AVX2`). A value the user exported wins.

`OMP_WAIT_POLICY` is left alone: our C++ kernels (x3d_exp.kernels) use their
own sleeping thread pool instead of OpenMP, whose spinning workers starved
MindSpore's thread pool unless the variable was exported before Python started.
"""

import os

DEFAULT_ONEDNN_ISA = "AVX2"


def prepare_process() -> None:
    """Cap oneDNN at AVX2 (unless already set) and quieten MindSpore's C++ logging. Imports no MindSpore."""
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", DEFAULT_ONEDNN_ISA)
    # MindSpore's C++ logging otherwise floods stderr with warnings on every run.
    os.environ.setdefault("GLOG_v", "3")
