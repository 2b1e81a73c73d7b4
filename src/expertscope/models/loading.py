"""Loading a causal LM and its tokenizer from a local directory, the bundled demo, or a hub id."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError
from ..progress import quiet_logger
from .model import MoEModel

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """``"float32"``/``"bf16"``/... → torch dtype; ``"auto"``/None → ``"auto"`` (the checkpoint's own)."""
    if dtype is None or dtype == "auto":
        return "auto"
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}: use one of auto, {', '.join(sorted(DTYPES))}")
    return DTYPES[dtype]


@dataclass(frozen=True)
class ModelSource:
    """A ``--model`` value resolved once: ``name`` as given, ``path`` to load from, ``local`` whether that is a
    directory here (a bundled demo or a model directory) rather than a hub id."""

    name: str
    path: str
    local: bool

    @classmethod
    def resolve(cls, path_or_id: str | ModelSource) -> ModelSource:
        """Resolve ``"demo"``/``"demo-deepseek"`` (the bundled demos), a local directory, or a hub id; raises
        :class:`ModelError` naming the fix for a missing bundled model, a file, or a directory without config."""
        from .bundled import DEMO_NAMES, demo_model_path

        if isinstance(path_or_id, ModelSource):
            return path_or_id
        if not isinstance(path_or_id, str):
            from ..errors import InputTypeError

            raise InputTypeError(f"model is a {type(path_or_id).__name__}, not a path or hub id: pass e.g. "
                                 "'demo' or './my-model'")
        if path_or_id in DEMO_NAMES:
            path = demo_model_path(path_or_id)
            if not (path / "config.json").exists():
                raise ModelError(f"the bundled {path_or_id} model is missing from {path}: reinstall expertscope or "
                                 f"run `expertscope demo train --demo {path_or_id}`")
            return cls(path_or_id, str(path), True)
        p = Path(path_or_id).expanduser()
        if p.exists():
            if not p.is_dir():
                raise ModelError(f"{p} is a file: pass the model's directory (with config.json)")
            if not (p / "config.json").exists():
                raise ModelError(f"{p} has no config.json: pass a Hugging Face model directory")
            return cls(path_or_id, str(p), True)
        if path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") > 1:
            raise ModelError(f"model directory {path_or_id} does not exist: check the path")
        return cls(path_or_id, path_or_id, False)

    def moe_shape(self) -> tuple[int, int] | None:
        """``(MoE layers, routed experts per layer)`` read from a local ``config.json`` without loading weights,
        or None when the config does not say (then checks that need it wait for the model)."""
        import json

        if not self.local:
            return None
        try:
            cfg = json.loads((Path(self.path) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}
        experts = next((cfg[k] for k in ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
                        if isinstance(cfg.get(k), int)), None)
        layers = cfg.get("num_hidden_layers")
        if not isinstance(experts, int) or not isinstance(layers, int):
            return None
        dense = set(cfg.get("mlp_only_layers") or ())
        step = cfg.get("decoder_sparse_step") or 1
        first = cfg.get("first_k_dense_replace") or 0
        freq = cfg.get("moe_layer_freq") or 1  # DeepSeek: every freq-th layer; Qwen2-MoE: decoder_sparse_step
        moe = [i for i in range(layers) if i >= first and i not in dense and (i + 1) % step == 0 and i % freq == 0]
        return len(moe), experts


def resolve_source(path_or_id: str | ModelSource) -> tuple[str, bool]:
    """``(where to load from, is_local)`` (see :class:`ModelSource`)."""
    s = ModelSource.resolve(path_or_id)
    return s.path, s.local


def _check_weights(path: Path, allow_pickle: bool) -> bool:
    """Whether to load safetensors; refuse pickled-only checkpoints unless allowed."""
    safes = list(path.glob("*.safetensors"))
    if safes:
        return True
    pickled = [f for f in path.iterdir() if f.suffix in _PICKLE_SUFFIXES]
    if pickled and not allow_pickle:
        raise ModelError(
            f"{path} has only pickled weights ({pickled[0].name}), which can run code when loaded: convert them "
            "to safetensors, or pass --allow-pickle if you trust the source"
        )
    return False


def _hub_available(repo_id: str, revision: str | None) -> bool:
    """Whether ``repo_id`` can be had without waiting on retries: cached, or the hub answers a connection."""
    import os
    import socket
    from urllib.parse import urlparse

    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(repo_id, "config.json", revision=revision), str):
            return True
    except Exception:  # an invalid repo id is reported by the fetch itself
        return True
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=3).close()
    except OSError:
        return False
    return True


def _first_line(e: BaseException) -> str:
    """An exception's first non-empty line, whole (messages must not be cut mid-sentence)."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return lines[0].rstrip(":") if lines else type(e).__name__


def _has_tokenizer(path: Path) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
    return any((path / n).exists() for n in names)


def _refuse_bypassing_paths(config: Any, use_kernels: bool) -> None:
    quant = getattr(config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
    if str(method).lower() == "mxfp4" or use_kernels:
        raise ModelError(
            "this model runs its MoE through fused kernels (MXFP4 / use_kernels) that bypass the router's "
            "forward, so routing cannot be captured: load the dequantized (bf16) weights without use_kernels"
        )


def load_model(
    path_or_id: str | ModelSource,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    allow_pickle: bool = False,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, str] | None = None,
    offload_folder: str | None = None,
    use_kernels: bool = False,
    verify: bool = True,
) -> MoEModel:
    """Load a Mixture-of-Experts causal LM and its tokenizer, find and self-check its routers.

    ``path_or_id``: a local Hugging Face directory, ``"demo"``, or a hub id (needs network or cache).
    Remote model code runs only with ``trust_remote_code=True``; weights load from safetensors, and pickled
    checkpoints are refused unless ``allow_pickle``. ``device_map``/``max_memory``/``offload_folder`` are
    passed to transformers (accelerate) for models larger than one device.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if isinstance(path_or_id, os.PathLike):
        path_or_id = os.fspath(path_or_id)
    if not isinstance(path_or_id, str | ModelSource):
        from ..errors import InputTypeError

        raise InputTypeError(f"path_or_id is a {type(path_or_id).__name__}, not a string: pass a model directory, "
                             "a hub id or 'demo', e.g. es.load_model('demo')")
    hf_logging.disable_progress_bar()  # expertscope shows its own progress
    resolved = ModelSource.resolve(path_or_id)
    source, local, path_or_id = resolved.path, resolved.local, resolved.name
    torch_dtype = parse_dtype(dtype)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code, "revision": revision}
    if not local and not _hub_available(source, revision):
        raise ModelError(
            f"cannot fetch {path_or_id!r}: the Hugging Face hub is unreachable (offline) and it is not in the local "
            "cache: download it and pass its local directory, e.g. --model ./my-model"
        )
    try:
        with quiet_logger("huggingface_hub"):
            config = AutoConfig.from_pretrained(source, **kwargs)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelError(
                f"{path_or_id} needs its own model code: pass --trust-remote-code if you trust its source"
            ) from None
        raise ModelError(f"cannot read the config of {path_or_id}: {str(e).splitlines()[0]}") from None
    except OSError as e:
        if local:
            raise ModelError(f"cannot read {source}/config.json: {str(e).splitlines()[0]}") from None
        raise ModelError(
            f"cannot fetch {path_or_id!r} from the Hugging Face hub (offline, or no such model): download it "
            "and pass its local directory, e.g. --model ./my-model"
        ) from None
    _refuse_bypassing_paths(config, use_kernels)
    use_safetensors = _check_weights(Path(source), allow_pickle) if local else (not allow_pickle or None)
    load_kwargs: dict[str, Any] = {**kwargs, "dtype": torch_dtype, "use_safetensors": use_safetensors}
    if device_map is not None:
        load_kwargs.update(device_map=device_map, max_memory=max_memory, offload_folder=offload_folder)
    if device is not None:
        from ..validation import check_device

        check_device(str(device))
    # Mismatched shapes are loaded as reported (not raised) so the error below can name the tensor; the
    # load report transformers prints (20+ lines) is kept off stderr and summed up in one line.
    load_kwargs.update(output_loading_info=True, ignore_mismatched_sizes=True)
    try:
        with quiet_logger("huggingface_hub"), _captured_load_report() as reports:
            loaded: Any = AutoModelForCausalLM.from_pretrained(source, config=config, **load_kwargs)
        model, loading_info = loaded  # (model, info) with output_loading_info
    except Exception as e:  # safetensors raises its own SafetensorError for corrupt or truncated files
        if not isinstance(e, OSError | ValueError | RuntimeError) and type(e).__name__ != "SafetensorError":
            raise
        if reports:  # transformers reported the problem in its load report: the weights do not fit the config
            raise ModelError(f"the weights of {path_or_id} do not fit its config.json ({_report_summary(reports)}): "
                             "use the config.json saved with these weights") from None
        raise ModelError(f"cannot load the weights of {path_or_id} ({_first_line(e)}): the files may be corrupt "
                         "or truncated; download or save them again") from None
    _check_loading_info(path_or_id, loading_info)
    if local and not _has_tokenizer(Path(source)):
        raise ModelError(f"{source} has no tokenizer (no tokenizer.json, tokenizer_config.json or tokenizer.model): "
                         "save the model's tokenizer into that directory (tokenizer.save_pretrained(dir))")
    try:
        with quiet_logger("huggingface_hub"):
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer of {path_or_id} ({_first_line(e)}): save the model's "
                         "tokenizer into its directory") from None
    if device is not None and device_map is None:
        # transformers wraps PreTrainedModel.to in a decorator whose stub loses the bound self
        model = model.to(device)
    moe = MoEModel.from_model(model, tokenizer=tokenizer, source=path_or_id, verify=verify)
    moe.revision = revision or getattr(config, "_commit_hash", None)
    return moe


@contextlib.contextmanager
def _captured_load_report() -> Iterator[list[str]]:
    """Keep transformers' multi-line ``LOAD REPORT`` warning off stderr; yield the reports' text."""
    import logging

    captured: list[str] = []

    class _Keep(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            msg = record.getMessage()
            if "LOAD REPORT" in msg:
                captured.append(msg)
                return False
            return True

    keep = _Keep()
    loggers = [logging.getLogger(n) for n in ("transformers.modeling_utils", "transformers.utils.loading_report")]
    for log in loggers:
        log.addFilter(keep)
    try:
        yield captured
    finally:
        for log in loggers:
            log.removeFilter(keep)


def _report_summary(reports: list[str]) -> str:
    """The first problem row of a transformers load report: ``key STATUS``."""
    import re

    for line in "\n".join(reports).splitlines():
        cells = [re.sub(r"\x1b\[[0-9;]*m", "", c).strip() for c in line.split("|")]
        if len(cells) >= 2 and cells[1] in ("MISMATCH", "MISSING", "CONVERSION", "UNEXPECTED"):
            what = {"MISMATCH": "has another shape", "MISSING": "is missing from the checkpoint",
                    "CONVERSION": "cannot be converted", "UNEXPECTED": "is not used by the config"}[cells[1]]
            return f"{cells[0]} {what}"
    return "see transformers' load report"


def _check_loading_info(path_or_id: str, info: dict[str, Any]) -> None:
    """Refuse a checkpoint whose tensors do not fit the config (their stand-ins would be random); name one
    unused tensor in a single warning line."""
    mismatched = sorted(info.get("mismatched_keys") or [], key=lambda m: str(m[0]))
    if mismatched:
        key, ckpt, want = mismatched[0]
        more = f" and {len(mismatched) - 1} more" if len(mismatched) > 1 else ""
        raise ModelError(f"the weights of {path_or_id} do not fit its config.json: {key} is {list(ckpt)} in the "
                         f"checkpoint but {list(want)} by the config{more}: use the config.json saved with these "
                         "weights")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelError(f"the weights of {path_or_id} lack {missing[0]}{more}, which its config.json needs (they "
                         "would be random): use the complete checkpoint, or the config.json saved with it")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        import warnings

        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        warnings.warn(f"{path_or_id} holds {unexpected[0]}{more}, which its config.json does not use: ignored",
                      stacklevel=3)
