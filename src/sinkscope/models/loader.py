"""Load a causal LM from a bundled name, a hub id, a local directory, a .gguf file or a live object."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..attention.interface import restore, variant_of
from ..errors import ModelLoadError, UnsupportedModelError
from .bundled import BUNDLED, cache_root, file_digest

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")  # org/name
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


def input_device(model: Any) -> torch.device:
    """Where a batch goes: the input embeddings' device (the CPU when they are offloaded to disk, since
    accelerate's hooks then bring weights and inputs together)."""
    device = model.get_input_embeddings().weight.device
    return torch.device("cpu") if device.type == "meta" else device


def placement(model: Any) -> str:
    """The model's device, or its devices (``cpu+disk``) when accelerate spread it with a device map."""
    device_map = getattr(model, "hf_device_map", None)
    if isinstance(device_map, dict) and len(set(map(str, device_map.values()))) > 1:
        return "+".join(sorted({str(d) for d in device_map.values()}))
    return str(input_device(model))


# Model types whose softmax layers call transformers' attention interface though their class does not declare
# it (the engine still checks, every forward, that each softmax layer's call came through it).
ROUTES_ATTENTION = frozenset({"qwen3_next"})


def check_attention_supported(model: Any) -> None:
    """Refuse models whose attention sinkscope cannot see (no softmax attention, or no attention interface)."""
    config = text_config(model)
    name = type(model).__name__
    if getattr(config, "num_attention_heads", None) is None:
        raise UnsupportedModelError(
            f"{name} (model_type '{config.model_type}') has no softmax attention heads; "
            "attention sinks are not defined for it"
        )
    if not (getattr(model, "_supports_attention_backend", False) or config.model_type in ROUTES_ATTENTION):
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
        device=placement(model),
        revision=revision,
    )


def _resolve_dtype(dtype: str) -> torch.dtype | str:
    if dtype == "auto":
        return "auto"
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype '{dtype}' (choose from auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def _device_kwargs(device: str, max_memory: dict[str, Any] | None = None) -> dict[str, Any]:
    if device == "cpu":
        return {}
    if device == "auto":
        # device_map="auto" spreads a model larger than one device over all of them, the GPUs first, then
        # CPU memory, then disk (accelerate's offload: weights read back layer by layer as they are used).
        offload = cache_root() / "offload"
        return {"device_map": "auto", "offload_folder": str(offload),
                **({"max_memory": max_memory} if max_memory is not None else {})}
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
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=dtype, trust_remote_code=False, **device_kwargs
        )
    except Exception as error:  # a damaged file surfaces as many exception types (struct.error, KeyError, ...)
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


CACHE_FORMAT = 2  # bump when what is cached, or how, changes: older entries are then not reused


def dequantiser_versions() -> dict[str, str]:
    """What turned a GGUF file into the cached fp32 weights: an entry made by other versions is not reused."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"cache_format": str(CACHE_FORMAT)}
    for package in ("transformers", "gguf"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = "absent"
    return versions


def _bundled_cache_dir(name: str, digest: str, versions: dict[str, str]) -> Path:
    """One entry per (file content, dequantiser): size and mtime do not tell two files apart."""
    tag = hashlib.sha256(json.dumps(versions, sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{name}-{digest[:16]}-{tag}"


def _read_cache(cached: Path, digest: str, versions: dict[str, str], dtype: Any,
                device_kwargs: dict[str, Any]) -> tuple[Any, Any] | None:
    """The cached model and tokenizer if the entry records this exact file and dequantiser, else None."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    meta_path = cached / "sinkscope-meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("sha256") != digest or meta.get("dequantiser") != versions:
            raise ValueError("cache entry made from another file or by another dequantiser")
        model = AutoModelForCausalLM.from_pretrained(str(cached), dtype=dtype, trust_remote_code=False,
                                                     **device_kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(cached), trust_remote_code=False)
    except Exception:  # a damaged or foreign entry is rebuilt from the GGUF
        shutil.rmtree(cached, ignore_errors=True)
        return None
    return model, tokenizer


def _load_bundled(name: str, dtype: Any, device_kwargs: dict[str, Any]) -> tuple[Any, Any, str]:
    """Model, tokenizer and the sha256 of the GGUF file they come from (hashed on every load: ~0.4 s)."""
    from transformers import AutoModelForCausalLM

    gguf_path = BUNDLED[name].locate()
    digest = file_digest(gguf_path)
    versions = dequantiser_versions()
    cached = _bundled_cache_dir(name, digest, versions)
    hit = _read_cache(cached, digest, versions, dtype, device_kwargs)
    if hit is not None:
        return hit[0], hit[1], digest
    model, tokenizer = _from_gguf(gguf_path, torch.float32, {})
    if file_digest(gguf_path) != digest:  # the provenance must name the bytes that were dequantised
        raise ModelLoadError(f"{gguf_path} changed while it was being read; load it again")
    _write_cache(model, tokenizer, cached, {"sha256": digest, "gguf": str(gguf_path), "dequantiser": versions})
    if dtype in ("auto", torch.float32) and not device_kwargs:
        return model, tokenizer, digest
    if (cached / "sinkscope-meta.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(str(cached), dtype=dtype, trust_remote_code=False,
                                                     **device_kwargs)
        return model, tokenizer, digest
    # the cache could not be written (read-only home?): convert the dequantised model in memory
    target_device = device_kwargs.get("device_map", "cpu")
    if target_device == "auto":
        target_device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(dtype=dtype, device=target_device), tokenizer, digest


def _write_cache(model: Any, tokenizer: Any, target: Path, meta: dict[str, Any]) -> None:
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


_Built = tuple[Any, Any, str, str | None]  # model, tokenizer, source kind, revision (provenance)


def _from_directory(path: Path, dtype: Any, device_kwargs: dict[str, Any], trust_remote_code: bool,
                    revision: str | None) -> _Built:
    if not path.is_dir():
        raise ModelLoadError(f"{path} is neither a model directory nor a .gguf file")
    if (path / "config.json").is_file():
        model, tok = _from_pretrained(str(path), dtype, device_kwargs, trust_remote_code, revision)
        return model, tok, "local", getattr(model.config, "_commit_hash", None)
    ggufs = sorted(path.glob("*.gguf"))
    if not ggufs:
        raise ModelLoadError(f"{path} has no config.json and no .gguf file: not a model directory")
    if len(ggufs) > 1:
        raise ModelLoadError(f"{path} holds {len(ggufs)} .gguf files ({', '.join(g.name for g in ggufs[:3])}"
                             f"{', ...' if len(ggufs) > 3 else ''}); pass the one to load as --model")
    model, tok = _from_gguf(ggufs[0], dtype, device_kwargs)
    return model, tok, "gguf", f"sha256:{file_digest(ggufs[0])}"


def _from_reference(ref: str, dtype: Any, device_kwargs: dict[str, Any], trust_remote_code: bool,
                    revision: str | None) -> _Built:
    """A bundled name, a .gguf file, a local directory or a hub id, tried in that order."""
    path = Path(ref).expanduser()
    if ref in BUNDLED:
        model, tok, digest = _load_bundled(ref, dtype, device_kwargs)
        return model, tok, "bundled", f"sha256:{digest}"
    if ref.endswith(".gguf"):
        model, tok = _from_gguf(path, dtype, device_kwargs)
        return model, tok, "gguf", f"sha256:{file_digest(path)}"
    if path.exists():
        return _from_directory(path, dtype, device_kwargs, trust_remote_code, revision)
    if "/" in ref and not HUB_ID.fullmatch(ref):  # ./x, /x, ~/x, x/, a/b/c: meant as a path
        raise ModelLoadError(f"no such file or directory: {ref}")
    if "/" not in ref:
        raise ModelLoadError(
            f"'{ref}' is not a bundled model ({', '.join(BUNDLED)}), an existing path, or a hub id (org/name)"
        )
    model, tok = _from_pretrained(ref, dtype, device_kwargs, trust_remote_code, revision)
    return model, tok, "hub", getattr(model.config, "_commit_hash", None) or revision


def _live(model: Any, tokenizer: Any) -> LoadedModel:
    if not hasattr(model, "config") or not hasattr(model, "forward"):
        raise ModelLoadError(f"cannot use an object of type {type(model).__name__} as a model")
    check_attention_supported(model)
    model.eval()
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    return LoadedModel(model, tokenizer, describe(model, tokenizer, name, "live"))


def load(
    source: Any,
    *,
    tokenizer: Any = None,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    revision: str | None = None,
    max_memory: dict[str, Any] | None = None,
) -> LoadedModel:
    """Load a causal LM for sinkscope.

    `source` is a bundled name (``smollm2-135m``, ``gemma3-270m``), a hub id, a local model directory,
    a ``.gguf`` file, an already-built transformers model, or a `LoadedModel` (returned as is).
    ``device="auto"`` spreads the model over GPUs, CPU and disk (``max_memory``, e.g. ``{"cpu": "2GiB"}``,
    caps what each may hold). ``trust_remote_code`` is never turned on unless asked.
    """
    if isinstance(source, LoadedModel):
        return source
    _quiet_transformers()
    if not isinstance(source, (str, os.PathLike)):
        return _live(source, tokenizer)
    ref = os.fspath(source)
    model, tok, kind, revision_used = _from_reference(ref, _resolve_dtype(dtype), _device_kwargs(device, max_memory),
                                                      trust_remote_code, revision)
    if tokenizer is not None:
        tok = tokenizer
    check_attention_supported(model)
    model.eval()
    return LoadedModel(model, tok, describe(model, tok, ref, kind, revision_used))
