"""`dpoflow doctor`: what this machine offers, the training plans a run of a pipeline would use, and
what would make that run fail after it started."""

from __future__ import annotations

from pathlib import Path


def doctor(config) -> int:
    """Print what this machine offers and what the hardware decision tree would do with `config`; exit
    code 1 when something found here would make a run of `config` fail (each named with a `!`)."""
    import importlib.util
    import tempfile

    import torch

    from dpoflow.engine.backends import BackendError, choose_backend
    from dpoflow.base.config import TrainSetup
    from dpoflow.base.hardware import GiB, count_parameters, describe, detect_gpu, model_shape, plan_stage
    from dpoflow.engine.models import BUILTIN, source_kind

    problems: list[str] = []
    gpu = detect_gpu()
    print(f"torch:    {torch.__version__}")
    print(f"CUDA:     {'available (' + str(torch.version.cuda) + ')' if gpu else 'not available'}")
    if gpu:
        cc = ".".join(map(str, gpu.compute_capability))
        print(f"GPU:      {gpu.name}, compute capability {cc}, {gpu.free_bytes / GiB:.1f} of "
              f"{gpu.total_bytes / GiB:.1f} GiB free, bf16 {'yes' if gpu.bf16_supported else 'no'}")
    # find_spec only: importing unsloth takes tens of seconds and patches TRL and transformers
    print(f"unsloth:  {'installed' if importlib.util.find_spec('unsloth') else 'not installed'}")
    backend = None
    try:
        choice = choose_backend(config.train if config else TrainSetup())
        backend = choice.name
        print(f"backend:  {choice.name} ({choice.reason})")
    except BackendError as e:
        print(f"backend:  not usable: {e}")
        if config is not None:
            problems.append(str(e))
    if config is None:
        print("(name a pipeline for its model and training plan)")
        return 0
    problems += preflight_problems(config, backend, gpu)

    kind = source_kind(config.model)
    if kind in ("hub", "pypi"):  # the run's model stage fetches or converts it: too slow for a check
        print(f"plan:     skipped: {config.model.source} is "
              + ("a Hub id (not downloaded here)" if kind == "hub" else "a package the model stage converts "
                 "(not converted here)"))
        return report_problems(config.name, problems)
    # The run plans each training stage when it starts, with plan_stage on the model it trains: the base
    # for SFT, for DPO the SFT model (the base with an adapter merged: the same shape and parameters).
    stages = {"sft": config.sft, "dpo": config.dpo} if config.runs_sft else {"dpo": config.dpo}
    if config.sft_skipped:
        print(f"sft:      {config.sft_skipped}")
    setup = config.train
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(config.model.source)
        if kind == "builtin":  # built in code in a second or two; exact counts beat a formula
            from dpoflow.engine.tiny import build_tiny_model

            folder = build_tiny_model(config.model.source[len(BUILTIN):], Path(tmp) / "model")
        try:
            n_params, shape = count_parameters(folder), model_shape(folder)
        except (OSError, KeyError, ValueError) as e:  # a local folder that is not a model (the model stage fails)
            problems.append(f"model: {e}")
            return report_problems(config.name, problems)
        print(f"model:    {config.model.source}: {n_params:,} parameters, hidden {shape['hidden_size']}, "
              f"{shape['num_hidden_layers']} layers, vocab {shape['vocab_size']:,}")
        for stage, spec in stages.items():
            print(f"plan for the {stage} stage (precision {setup.precision}, quantize {setup.quantize}, "
                  f"max_length {spec.max_length}):")
            try:
                plan = plan_stage(setup, spec, folder, gpu, backend or "trl")
            except ValueError as e:
                print(f"  not possible: {e}")
                problems.append(f"training plan: {e}")
                return report_problems(config.name, problems)
            print("\n".join("  " + line for line in describe(plan).splitlines()))
            if (plan.load_in_4bit or plan.precision == "fp8") and backend != "unsloth":
                problems.append("4-bit and FP8 weights load only through the unsloth backend "
                                "(pip install 'dpoflow[gpu]')")
    return report_problems(config.name, list(dict.fromkeys(problems)))  # one line for what both stages hit


def preflight_problems(config, backend: str | None, gpu) -> list[str]:
    """What would stop a run of `config` on this machine after it started, found without running it."""
    import importlib.util
    import os

    from dpoflow.engine import ggufexport
    from dpoflow.engine.backends import compile_cache_folders

    problems = []
    if "gguf" in config.export.formats:
        missing = ggufexport.missing_tools()
        if missing:  # the export stage would fail after all the training
            problems.append(f"export.formats has gguf but {', '.join(missing)} is not installed (llama.cpp's "
                            "converter and quantizer): pip install 'dpoflow[gguf]', or drop gguf from export.formats")
    client = {"mlflow": "mlflow", "wandb": "wandb", "trackio": "trackio",
              "tensorboard": "tensorboard"}.get(config.tracking.backend)
    if client and importlib.util.find_spec(client) is None:  # the run would stop before its first stage
        problems.append(f"tracking.backend is {config.tracking.backend} but the {client} package is not installed: "
                        "pip install 'dpoflow[tracking]', or set tracking.backend: none")
    if gpu is not None and not gpu.bf16_supported and config.train.precision == "auto":
        # Not a failure: the plan below says fp16 and warns; `precision: bf16` fails there instead.
        print(f"warning:  {gpu.name} has no bf16: precision auto trains in fp16, a known source of NaN DPO losses")
    if backend == "unsloth":
        # Unsloth's first step compiles every layer into these caches (backends.keep_compile_caches); a
        # folder that cannot be written fails that step, after the model load.
        for variable, folder in compile_cache_folders().items():
            if not writable(folder):
                problems.append(f"the compile cache folder {folder} is not writable: set DPOFLOW_CACHE_DIR (or "
                                f"{variable}) to a writable folder")
        # Unsloth writes the model code it generates here (relative: the working directory).
        folder = Path(os.environ.get("UNSLOTH_COMPILE_LOCATION") or "unsloth_compiled_cache").absolute()
        if folder.exists() and not writable(folder):  # a missing one Unsloth makes, or falls back to /tmp
            problems.append(f"Unsloth's compile cache folder {folder} is not writable: set UNSLOTH_COMPILE_LOCATION "
                            "to a writable folder, or run from a writable directory")
    return problems


def writable(folder: Path) -> bool:
    """Whether files can be created in `folder` (made if missing, as the run would make it)."""
    import tempfile

    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def report_problems(name: str, problems: list[str]) -> int:
    for problem in problems:
        print(f"! {problem}")
    if problems:
        print(f"doctor: {len(problems)} problem(s) would make a run of {name!r} fail")
    return 1 if problems else 0
