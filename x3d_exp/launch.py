"""Process set-up that must happen before MindSpore is imported."""

import os


def prepare_process() -> None:
    """Cap oneDNN at AVX2 unless the user chose otherwise: its AVX-512 convolutions are far slower here."""
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
    # MindSpore's C++ logging otherwise floods stderr with warnings on every run.
    os.environ.setdefault("GLOG_v", "3")
