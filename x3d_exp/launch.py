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
import signal

DEFAULT_ONEDNN_ISA = "AVX2"


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")


def prepare_process() -> None:
    """Cap oneDNN at AVX2 (unless already set), quieten MindSpore's C++ logging, make SIGTERM an interrupt.

    Imports no MindSpore.
    """
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", DEFAULT_ONEDNN_ISA)
    # MindSpore's C++ logging otherwise floods stderr with warnings on every run.
    os.environ.setdefault("GLOG_v", "3")
    # MindSpore answers Ctrl+C by sending the process SIGTERM, which kills Python without unwinding; turning it
    # into KeyboardInterrupt lets the MLflow run be closed as FAILED (msrun and Slurm stop jobs with SIGTERM too).
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


def _one_line(err: Exception) -> str:
    """Hydra's composition errors as one line naming the override or key (its own messages span 5-15 lines)."""
    import re

    from hydra.errors import MissingConfigException, OverrideParseException

    cause = err.__cause__
    if isinstance(err, MissingConfigException):
        missing = re.search(r"Could not find '([^']+)'", str(err))
        name = missing.group(1) if missing else str(err).splitlines()[0]
        group, _, option = name.rpartition("/")
        if group and err.options:
            return f"{group}={option}: no such option; choose one of {', '.join(sorted(err.options))}"
        return f"could not find config {name!r}"
    if isinstance(err, OverrideParseException):
        return str(err).splitlines()[0] + " (see https://hydra.cc/docs/advanced/override_grammar/basic)"
    key = getattr(cause, "full_key", None)
    if key:
        reason = str(cause).splitlines()[0]
        if "not in" in reason:
            return f"{key}: no such key (to add one, write +{key}=...)"
        override = re.search(r"override (\S+)", str(err))
        return f"{override.group(1) if override else key}: {reason}"
    return " ".join(str(err).split())


def check_overrides(config_dir: str, config_name: str, argv) -> None:
    """Compose the run's config once before Hydra does, so a bad override or value exits with one line.

    Runs only for plain single runs: Hydra's flags (-m, --cfg, ...) and hydra.* overrides are left to Hydra.
    """
    import sys

    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from x3d_exp.config import ConfigError, validate

    if any(arg.startswith("-") for arg in argv):
        return
    overrides = [arg for arg in argv if not arg.lstrip("+~").startswith(("hydra.", "hydra/"))]
    try:
        with initialize_config_dir(version_base="1.3", config_dir=config_dir, job_name="check"):
            validate(compose(config_name, overrides=overrides))
    except (HydraException, OmegaConfBaseException) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        sys.exit(2)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
