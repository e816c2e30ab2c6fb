"""The training library: build (device, network, optimizer), evaluate, checkpoint and resume, callbacks.

It reads the composed config (an OmegaConf DictConfig) but never Hydra's global state, MLflow, the tasks or the
msrun launcher: `x3d_exp.tasks` wires it to those (docs/architecture.md).
"""
