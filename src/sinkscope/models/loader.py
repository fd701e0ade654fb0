"""Load a causal LM from a bundled name, a hub id, a local directory, a .gguf file or a live object."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelLoadError, UnsupportedModelError
from .bundled import BUNDLED, cache_root, file_digest

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelInfo:
    """What a result needs to know about the model it came from."""

    name: str
    source: str  # bundled | hub | local | gguf | live
    model_type: str
    architecture: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    layer_types: list[str]
    sliding_window: int | None
    bos_token_id: int | None
    bos_token: str | None
    dtype: str
    device: str
    revision: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedModel:
    """A transformers causal LM, its tokenizer (may be None) and what sinkscope knows about it."""

    model: Any
    tokenizer: Any
    info: ModelInfo

    def __repr__(self) -> str:
        i = self.info
        return (
            f"LoadedModel({i.name!r}, {i.architecture}, {i.n_layers} layers x {i.n_heads} heads "
            f"({i.n_kv_heads} kv), bos={i.bos_token!r}, {i.dtype} on {i.device})"
        )


def text_config(model: Any) -> Any:
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_attention_supported(model: Any) -> None:
    """Refuse models whose attention sinkscope cannot see (no softmax attention, or no attention interface)."""
    config = text_config(model)
    name = type(model).__name__
    if getattr(config, "num_attention_heads", None) is None:
        raise UnsupportedModelError(
            f"{name} (model_type '{config.model_type}') has no softmax attention heads; "
            "attention sinks are not defined for it"
        )
    if not getattr(model, "_supports_attention_backend", False):
        raise UnsupportedModelError(
            f"{name} does not route attention through transformers' attention interface, so sinkscope "
            "cannot capture it (supported: llama, mistral, qwen2/3, gemma/2/3, gpt2, gpt_neox, phi3, gpt_oss, ...)"
        )


def describe(model: Any, tokenizer: Any, name: str, source: str, revision: str | None = None) -> ModelInfo:
    config = text_config(model)
    n_layers = int(config.num_hidden_layers)
    n_heads = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_heads)
    layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * n_layers)
    bos_id = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
    if bos_id is None and tokenizer is None:
        bos_id = getattr(config, "bos_token_id", None)
    bos_token = None
    if tokenizer is not None and bos_id is not None:
        bos_token = tokenizer.convert_ids_to_tokens(int(bos_id))
    param = next(model.parameters())
    return ModelInfo(
        name=name,
        source=source,
        model_type=str(config.model_type),
        architecture=type(model).__name__,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        layer_types=layer_types,
        sliding_window=getattr(config, "sliding_window", None),
        bos_token_id=None if bos_id is None else int(bos_id),
        bos_token=bos_token,
        dtype=str(param.dtype).removeprefix("torch."),
        device=str(param.device),
        revision=revision,
    )


def _resolve_dtype(dtype: str) -> torch.dtype | str:
    if dtype == "auto":
        return "auto"
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype '{dtype}' (choose from auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def _device_kwargs(device: str) -> dict[str, Any]:
    if device == "cpu":
        return {}
    if device == "auto":
        # device_map="auto" spreads a model larger than one device over all of them (needs accelerate).
        return {"device_map": "auto"} if torch.cuda.is_available() else {}
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelLoadError(f"--device {device} was asked for but torch sees no CUDA device")
        return {"device_map": device}
    raise ModelLoadError(f"unknown device '{device}' (choose cpu, cuda, cuda:N or auto)")


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()  # sinkscope shows its own progress


def _check_gguf_file(path: Path) -> None:
    if not path.is_file():
        raise ModelLoadError(f"no such file: {path}")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ModelLoadError(f"{path} is not a GGUF file (bad magic bytes)")


def _from_gguf(path: Path, dtype: Any, device_kwargs: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_gguf_file(path)
    import importlib.util

    for package in ("gguf", "accelerate"):  # transformers needs both to read GGUF
        if importlib.util.find_spec(package) is None:
            raise ModelLoadError(f"loading .gguf files needs the '{package}' package: pip install {package}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype, **device_kwargs
        )
    except (ValueError, OSError, KeyError, IndexError, EOFError, RuntimeError, MemoryError) as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"cannot read GGUF file {path} (truncated or corrupt?): {reason}") from error
    return model, tokenizer


def _from_pretrained(
    ref: str, dtype: Any, device_kwargs: dict[str, Any], trust_remote_code: bool, revision: str | None
) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            ref, dtype=dtype, trust_remote_code=trust_remote_code, revision=revision, **device_kwargs
        )
    except ValueError as error:
        message = str(error).splitlines()[0][:300]
        if "trust_remote_code" in str(error):
            message = f"'{ref}' needs custom code from its repository; pass --trust-remote-code if you trust it"
        raise ModelLoadError(f"cannot build a causal LM from '{ref}': {message}") from error
    except OSError as error:
        raise ModelLoadError(f"cannot load '{ref}': {str(error).splitlines()[0][:300]}") from error
    except Exception as error:  # corrupt weights surface as many exception types
        raise ModelLoadError(f"cannot load '{ref}': {type(error).__name__}: {str(error)[:300]}") from error
    from ..capture.attention import restore, variant_of

    if variant_of(model.config) is not None:  # a sinkscope lab model: re-install its attention variant
        if not Path(ref).is_dir():
            raise ModelLoadError(f"'{ref}' is a sinkscope lab model ({variant_of(model.config)} attention); "
                                 "download it and load the local directory")
        restore(model, ref)
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code, revision=revision)
    except Exception:  # a model directory without tokenizer files is still usable with input_ids
        tokenizer = None
    return model, tokenizer


def _bundled_cache_dir(name: str, gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    return cache_root() / "models" / f"{name}-{stat.st_size}-{int(stat.st_mtime)}"


def _load_bundled(name: str, dtype: Any, device_kwargs: dict[str, Any]) -> tuple[Any, Any, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = BUNDLED[name].locate()
    cached = _bundled_cache_dir(name, gguf_path)
    meta_path = cached / "sinkscope-meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            model = AutoModelForCausalLM.from_pretrained(str(cached), dtype=dtype, **device_kwargs)
            tokenizer = AutoTokenizer.from_pretrained(str(cached))
            return model, tokenizer, meta["sha256"]
        except Exception:  # a damaged cache is rebuilt from the GGUF below
            shutil.rmtree(cached, ignore_errors=True)
    model, tokenizer = _from_gguf(gguf_path, torch.float32, {})
    digest = file_digest(gguf_path)
    _write_cache(model, tokenizer, cached, {"sha256": digest, "gguf": str(gguf_path)})
    if dtype not in ("auto", torch.float32) or device_kwargs:
        model = AutoModelForCausalLM.from_pretrained(str(cached), dtype=dtype, **device_kwargs)
    return model, tokenizer, digest


def _write_cache(model: Any, tokenizer: Any, target: Path, meta: dict[str, str]) -> None:
    # GGUF-loaded models refuse save_pretrained while they carry the quantizer; the weights are fp32 already.
    model.hf_quantizer = None
    for config in {id(model.config): model.config, id(text_config(model)): text_config(model)}.values():
        if hasattr(config, "quantization_config"):
            del config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "sinkscope-meta.json").write_text(json.dumps(meta))
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # a cache we cannot write only costs time


def load(
    source: Any,
    *,
    tokenizer: Any = None,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> LoadedModel:
    """Load a causal LM for sinkscope.

    `source` is a bundled name (``smollm2-135m``, ``gemma3-270m``), a hub id, a local model directory,
    a ``.gguf`` file, an already-built transformers model, or a `LoadedModel` (returned as is).
    ``trust_remote_code`` is never turned on unless asked.
    """
    if isinstance(source, LoadedModel):
        return source
    _quiet_transformers()
    if not isinstance(source, (str, os.PathLike)):
        if not hasattr(source, "config") or not hasattr(source, "forward"):
            raise ModelLoadError(f"cannot use an object of type {type(source).__name__} as a model")
        check_attention_supported(source)
        source.eval()
        name = getattr(source.config, "_name_or_path", "") or type(source).__name__
        return LoadedModel(source, tokenizer, describe(source, tokenizer, name, "live"))

    ref = os.fspath(source)
    torch_dtype = _resolve_dtype(dtype)
    device_kwargs = _device_kwargs(device)
    path = Path(ref).expanduser()
    if ref in BUNDLED:
        model, tok, digest = _load_bundled(ref, torch_dtype, device_kwargs)
        kind, revision_used = "bundled", f"sha256:{digest}"
    elif ref.endswith(".gguf"):
        model, tok = _from_gguf(path, torch_dtype, device_kwargs)
        kind, revision_used = "gguf", f"sha256:{file_digest(path)}"
    elif path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is neither a model directory nor a .gguf file")
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if not ggufs:
                raise ModelLoadError(f"{path} has no config.json and no .gguf file: not a model directory")
            model, tok = _from_gguf(ggufs[0], torch_dtype, device_kwargs)
            kind, revision_used = "gguf", f"sha256:{file_digest(ggufs[0])}"
        else:
            model, tok = _from_pretrained(str(path), torch_dtype, device_kwargs, trust_remote_code, revision)
            kind, revision_used = "local", getattr(model.config, "_commit_hash", None)
    elif ref.startswith((".", "/", "~")) or os.sep in ref.strip("/").split("/", 1)[-1]:
        raise ModelLoadError(f"no such file or directory: {ref}")
    elif "/" not in ref:
        raise ModelLoadError(
            f"'{ref}' is not a bundled model ({', '.join(BUNDLED)}), an existing path, or a hub id (org/name)"
        )
    else:
        model, tok = _from_pretrained(ref, torch_dtype, device_kwargs, trust_remote_code, revision)
        kind, revision_used = "hub", getattr(model.config, "_commit_hash", None) or revision
    if tokenizer is not None:
        tok = tokenizer
    check_attention_supported(model)
    model.eval()
    return LoadedModel(model, tok, describe(model, tok, ref, kind, revision_used))
